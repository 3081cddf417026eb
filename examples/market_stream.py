"""Stream real E-mini S&P 500 ticks into a session and ask about them.

Start a server first (``make serve``), then:

    python examples/market_stream.py [--url http://localhost:8000] [--ticks 400]

Ticks are appended in small batches as they "arrive"; a flash query keeps
the answer to "last price" fresh in the background, and every few batches
the script asks a question and prints how many tokens the server computed
for it (only the question's, however long the stream).
"""

from __future__ import annotations

import argparse
import itertools
import time

from vllm_stateful.client import Client
from vllm_stateful.feeds import tick_lines

QUESTION = "\nQuestion: what was the last traded price?\nAnswer:"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://localhost:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--ticks", type=int, default=400)
    ap.add_argument("--batch", type=int, default=20)
    args = ap.parse_args()

    client = Client(args.url, api_key=args.api_key)
    session = client.create_session(prefix="E-mini S&P 500 futures trades (time price size):\n")
    ticks = tick_lines()
    try:
        for i in range(args.ticks // args.batch):
            session.append("".join(itertools.islice(ticks, args.batch)))
            if i % 4 == 3:
                start = time.perf_counter()
                answer = session.query(QUESTION, max_tokens=8, temperature=0.0, consistency="latest")
                ms = (time.perf_counter() - start) * 1e3
                stats = session.stats()
                print(
                    f"{stats.tokens:>6} tokens in session | {ms:7.1f} ms | "
                    f"answer {answer.text.strip()!r}"
                )
    finally:
        session.close()


if __name__ == "__main__":
    main()
