"""Ask questions about real E-mini S&P 500 ticks while they stream in.

Start a server first (``make serve``), then ``make demo``, or:

    python examples/market_stream.py [--url http://localhost:8000] [--duration-s 60]

A background task appends ticks to a session at a steady rate (a feed does
not wait for anyone; when the server says its ingestion backlog is full, 429,
the feed waits ``Retry-After`` seconds and sends again). Every few seconds a
question is asked while the ticks keep coming. Each line shows the context
the answer saw (tokens), the latency, and whether the answer was a flash hit:
"The last trade price was" is registered as a flash query, re-answered in
the background after every ingested version, so asking it is a cache read
(``staleness`` says how long ago a newer version superseded the answer; 0:
it is the newest). The other questions are computed on the spot, and cost
only their own tokens however long the stream grows.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import time

from vllm_stateful import errors
from vllm_stateful.client import AsyncClient, ContextLengthError, InvalidInputError
from vllm_stateful.feeds import tick_lines

HEADER = "E-mini S&P 500 futures trades, one line per trade (time price size):\n"
# Sentence starts that the small instruct model completes by copying the
# newest line's fields; the first is the flash query.
FLASH_QUESTION = "\nThe last trade price was"
# (question, answer tokens): a price needs ~7 tokens, a time ~12 (digits
# are one token each).
QUESTIONS = (("\nThe time of the last trade was", 13), ("\nThe price of the last trade was", 8))
MAX_TOKENS = 8


def retry_later(exc: Exception) -> bool:
    """The append was not taken and may be sent again after ``Retry-After``:
    the ingestion backlog is full (429), or an ingestion failed (503)."""
    code = getattr(exc, "code", "")
    if code in ("ingest_backlog_full", "ingestion_failed"):
        return True
    return getattr(exc, "http_status", None) == 429 and code != "session_budget_exceeded"


class Feed:
    """Appends ``batch`` ticks every ``batch / rate`` seconds, on schedule."""

    def __init__(self, session, ticks, rate: float, batch: int):
        self.session, self.ticks, self.rate, self.batch = session, ticks, rate, batch
        self.appended = self.refused = 0
        self.waited_s = 0.0
        self.stopped: str | None = None

    async def run(self) -> None:
        interval = self.batch / self.rate
        next_t = time.monotonic()
        while True:
            text = "".join(itertools.islice(self.ticks, self.batch))
            while True:
                try:
                    await self.session.append(text)
                    self.appended += 1
                    break
                except ContextLengthError:
                    self.stopped = "the context window is full"
                    return
                except errors.StatefulError as exc:
                    if not retry_later(exc):
                        raise
                    # Nothing was taken: come back when the server says.
                    delay = getattr(exc, "retry_after_s", None) or 1.0
                    self.refused += 1
                    self.waited_s += delay
                    await asyncio.sleep(delay)
            next_t += interval
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))


async def ask(session, prompt: str, max_tokens: int, staleness_ms: int | None, notes: set[str]):
    kwargs = {"max_tokens": max_tokens, "temperature": 0}
    if staleness_ms is not None and "no-staleness" not in notes:
        kwargs["max_staleness_ms"] = staleness_ms
    try:
        return await session.query(prompt, **kwargs)
    except InvalidInputError as exc:
        if "max_staleness_ms" not in str(exc):
            raise
        notes.add("no-staleness")
        kwargs.pop("max_staleness_ms")
        return await session.query(prompt, **kwargs)


async def main_async(args: argparse.Namespace) -> None:
    notes: set[str] = set()
    async with AsyncClient(args.url, api_key=args.api_key) as client:
        ticks = itertools.islice(tick_lines(), args.skip, None)
        session = await client.create_session(
            prefix=HEADER + "".join(itertools.islice(ticks, args.warm_ticks)), ttl_s=600
        )
        try:
            # One evaluation of the flash question on the idle engine: the
            # staleness a cached answer may have and still be served.
            t0 = time.perf_counter()
            await session.query(FLASH_QUESTION, max_tokens=MAX_TOKENS, temperature=0)
            eval_ms = round((time.perf_counter() - t0) * 1e3)
            staleness = args.max_staleness_ms if args.max_staleness_ms is not None else eval_ms
            try:
                await session.register_flash(FLASH_QUESTION, id="last-price", max_tokens=MAX_TOKENS,
                                             max_staleness_ms=staleness)  # fmt: skip
            except InvalidInputError as exc:
                if "max_staleness_ms" not in str(exc):
                    raise
                notes.add("no-staleness")
                await session.register_flash(FLASH_QUESTION, id="last-price", max_tokens=MAX_TOKENS)
            print(f"flash query registered (one evaluation: {eval_ms} ms; answers up to "
                  f"{staleness} ms stale are served)" if "no-staleness" not in notes else
                  "flash query registered (this server has no max_staleness_ms: only answers of "
                  "the newest ingested version are served)")  # fmt: skip
            print(f"streaming {args.rate:g} ticks/s ({args.batch} per append) for "
                  f"{args.duration_s:g} s, a question every {args.ask_every:g} s\n")  # fmt: skip
            print(f"{'t (s)':>5} {'context':>8} {'latency':>10}  {'how':<24} question -> answer")
            feed = Feed(session, ticks, args.rate, args.batch)
            feeder = asyncio.create_task(feed.run())
            rows = []
            start = time.monotonic()
            flash = (FLASH_QUESTION, MAX_TOKENS)
            prompts = itertools.cycle([flash, QUESTIONS[0], flash, QUESTIONS[1]])
            try:
                while time.monotonic() - start < args.duration_s and not feeder.done():
                    await asyncio.sleep(args.ask_every)
                    prompt, max_tokens = next(prompts)
                    is_flash = prompt == FLASH_QUESTION
                    t0 = time.perf_counter()
                    a = await ask(session, prompt, max_tokens, staleness if is_flash else None, notes)
                    ms = (time.perf_counter() - t0) * 1e3
                    context = a.usage.prompt_tokens if a.usage else a.session.version
                    hit = bool(a.session.flash)
                    stale = getattr(a.session, "staleness_ms", None)
                    how = (f"flash hit, {stale:.0f} ms stale" if hit and stale is not None else
                           "flash hit" if hit else f"computed {a.session.computed_tokens} tokens")  # fmt: skip
                    print(f"{time.monotonic() - start:5.0f} {context:8d} {ms:8.1f}ms  {how:<24} "
                          f"{prompt.strip()!r} -> {a.text.strip()!r}", flush=True)  # fmt: skip
                    rows.append((context, ms, is_flash, hit))
            finally:
                feeder.cancel()
                try:
                    await feeder
                except (asyncio.CancelledError, Exception):
                    pass
            if feed.stopped:
                print(f"\nthe feed stopped: {feed.stopped}")
            stats = await session.stats()
            summary(rows, feed, stats)
        finally:
            await session.close()


def summary(rows, feed: Feed, stats) -> None:
    print(f"\n{feed.appended} appends, {stats.tokens} tokens in the session; "
          f"{feed.refused} appends refused (429) and resent after {feed.waited_s:.1f} s")  # fmt: skip
    extra = {k: getattr(stats, k, None) for k in ("backlog_tokens", "ingest_lag_s", "ingest_rate_tps")}
    if any(v is not None for v in extra.values()):
        print("ingestion: " + ", ".join(f"{k} {v:.4g}" for k, v in extra.items() if v is not None))
    computed = sorted((r for r in rows if not r[3]), key=lambda r: r[0])
    if computed:
        k = max(1, len(computed) // 3)
        lo, hi = computed[:k], computed[-k:]
        print(f"computed answers, p50 latency: {statistics.median(r[1] for r in lo):.0f} ms at "
              f"~{lo[len(lo) // 2][0]} tokens of context, "
              f"{statistics.median(r[1] for r in hi):.0f} ms at ~{hi[len(hi) // 2][0]} tokens")  # fmt: skip
    flash = [r for r in rows if r[2]]
    if flash:
        hits = [r for r in flash if r[3]]
        p50 = f", p50 {statistics.median(r[1] for r in hits):.1f} ms" if hits else ""
        print(f"flash query: {len(hits)}/{len(flash)} asks were hits ({len(hits) / len(flash):.0%}){p50}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--duration-s", type=float, default=60.0, help="how long ticks stream")
    ap.add_argument("--rate", type=float, default=2.0, help="ticks per second")
    ap.add_argument("--batch", type=int, default=2, help="ticks per append")
    ap.add_argument("--ask-every", type=float, default=3.0, help="seconds between questions")
    ap.add_argument("--skip", type=int, default=300000,
                    help="start this many ticks into the data (default: 2013-09-03 10:22)")
    ap.add_argument("--warm-ticks", type=int, default=20, help="ticks in the session's prefix")
    ap.add_argument("--max-staleness-ms", type=int, default=None,
                    help="serve flash answers up to this stale (default: one measured evaluation)")  # fmt: skip
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
