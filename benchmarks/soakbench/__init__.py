"""Pieces of the soak run (``benchmarks/soak.py``).

sampler   the soak's sessions (one or two flash queries each, an open event
          stream each) and the sample taken every interval: RSS of the
          server's process tree, pins and blocks, event streams, queues
verdicts  the criteria of "no growth beyond the sessions' own data"
report    the Markdown and the plot
"""
