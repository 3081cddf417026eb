"""Stream real E-mini S&P 500 ticks into a session and ask about them.

Start a server first (``make serve``), then ``make demo``, or:

    python examples/market_stream.py [--url http://localhost:8000] [--ticks 300]

Ticks are appended in batches as they "arrive" and ingested in the
background. Every few batches the script asks a question on what is already
ingested and prints the latency and how many prompt tokens the server
computed for it: only the question's, however long the stream. A flash query
keeps the "last price" answer fresh in the background; asking it is a cache
hit.
"""

from __future__ import annotations

import argparse
import itertools
import time

from vllm_stateful.client import Client, ContextLengthError
from vllm_stateful.feeds import tick_lines

QUESTION = "\nQuestion: what was the last traded price?\nAnswer:"
TREND = "\nQuestion: is the price going up or down?\nAnswer:"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--ticks", type=int, default=300)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--interval", type=float, default=1.0, help="seconds between batches")
    args = ap.parse_args()

    client = Client(args.url, api_key=args.api_key)
    session = client.create_session(
        prefix="E-mini S&P 500 futures trades (time price size):\n",
        flash=[{"prompt": QUESTION, "max_tokens": 8, "id": "last-price"}],
    )
    ticks = tick_lines()
    try:
        for i in range(args.ticks // args.batch):
            try:
                session.append("".join(itertools.islice(ticks, args.batch)))
            except ContextLengthError as exc:
                print(f"context window full: {exc}")
                break
            time.sleep(args.interval)  # ticks arrive over time
            if i % 4 != 3:
                continue
            for label, prompt in (("trend", TREND), ("last price", QUESTION)):
                start = time.perf_counter()
                answer = session.query(prompt, max_tokens=8, temperature=0)
                ms = (time.perf_counter() - start) * 1e3
                how = "flash hit" if answer.session.flash else f"{answer.session.computed_tokens} computed"
                print(
                    f"v{answer.session.version:<3} {answer.usage.prompt_tokens:>5} prompt tokens "
                    f"({how:>12}) {ms:7.1f} ms  {label}: {answer.text.strip()!r}"
                )
    finally:
        session.close()


if __name__ == "__main__":
    main()
