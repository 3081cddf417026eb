"""Pieces of the live-stream benchmark (``benchmarks/live_stream.py``).

plan     the fixed open-loop schedule: feed lines, appends, Poisson questions
targets  how each engine is fed and asked over HTTP (sessions, or full prompts)
run      capacity, the idle reference, and one load level with every record
report   summaries, the table, the plot of latency over time
"""
