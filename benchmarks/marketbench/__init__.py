"""Pieces of the market-data benchmark (``benchmarks/market_stream.py``).

feed       market data as text lines (ticks or bars), tokenized per append
questions  the question set and how a question is framed after the stream
workloads  what each workload replays: sessions, appends, question points
engines    each engine as its server runs it, and why some cannot run here
servers    one server subprocess at a time: start, health, memory, stop
drivers    how each engine is asked (session API or full prompts over HTTP)
runner     replays one workload against one driver and records every event
results    the records, summaries and the JSON file
report     Markdown table, targets, plots
bounds     the memory-traffic bound of a decoded token, from model shapes
gguf_export  the same bf16 weights as a GGUF file for llama.cpp
"""
