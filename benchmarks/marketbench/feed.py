"""Market data as compact text lines, and their token ids.

The default source is the E-mini S&P 500 trade ticks shipped by ``mlfinpy``
(through :func:`vllm_stateful.feeds.tick_lines`); any CSV with
``DateTime,Price,Volume`` columns can stand in. Ticks can be aggregated into
fixed-interval OHLCV bars, which carry more time per token.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm_stateful.feeds import mlfinpy_ticks_path, tick_lines


@dataclass(frozen=True)
class Tick:
    clock: str  # HH:MM:SS.mmm
    seconds: float  # since midnight, for bar boundaries
    price: str  # as printed in the source, so lines round-trip exactly
    size: int


def ticks(path: str | Path | None = None) -> Iterator[Tick]:
    with open(path or mlfinpy_ticks_path(), newline="") as f:
        for row in csv.DictReader(f):
            clock = row["DateTime"].split(" ")[-1]
            h, m, s = clock.split(":")
            yield Tick(
                clock, int(h) * 3600 + int(m) * 60 + float(s), row["Price"], int(row["Volume"])
            )


def bar_lines(source: Iterator[Tick], seconds: float) -> Iterator[str]:
    """``HH:MM:SS open high low close volume trades`` per ``seconds`` bar;
    empty intervals produce no line (as a feed would send nothing)."""
    current: list[Tick] = []
    start = None
    for t in source:
        bucket = t.seconds - t.seconds % seconds
        if start is not None and bucket != start and current:
            yield _bar(current, start)
            current = []
        start = bucket
        current.append(t)
    if current and start is not None:
        yield _bar(current, start)


def _bar(group: list[Tick], start: float) -> str:
    prices = [float(t.price) for t in group]
    h, rem = divmod(int(start), 3600)
    clock = f"{h % 24:02d}:{rem // 60:02d}:{rem % 60:02d}"
    return (
        f"{clock} {prices[0]:.2f} {max(prices):.2f} {min(prices):.2f} {prices[-1]:.2f} "
        f"{sum(t.size for t in group)} {len(group)}\n"
    )


@functools.lru_cache(maxsize=4)
def lines(csv_path: str | None = None, bar_seconds: float | None = None) -> tuple[str, ...]:
    """The feed's text lines (ticks, or bars when ``bar_seconds`` is set),
    read once: every session indexes into the same day."""
    if bar_seconds:
        return tuple(bar_lines(ticks(csv_path), bar_seconds))
    return tuple(tick_lines(csv_path))


def line_format(bar_seconds: float | None) -> str:
    return "time open high low close volume trades" if bar_seconds else "time price size"


class LineTokens:
    """Successive feed lines as token ids, each line tokenized on its own
    (no special tokens), exactly as a session tokenizes one append.

    ``start`` begins further into the feed, so concurrent sessions replay
    different stretches of the same day.
    """

    def __init__(self, tokenizer: Any, source: Sequence[str], start: int = 0):
        if start >= len(source):
            raise ValueError(f"the feed has {len(source)} lines; cannot start at line {start}")
        self.tok = tokenizer
        self.lines = source
        self.pos = start

    def next_line(self) -> tuple[str, list[int]]:
        if self.pos >= len(self.lines):
            raise ValueError(f"the feed ran out after {len(self.lines)} lines")
        line = self.lines[self.pos]
        self.pos += 1
        return line, self.tok.encode(line, add_special_tokens=False)

    def take(self, n_tokens: int) -> list[int]:
        """At least ``n_tokens`` ids, whole lines only."""
        out: list[int] = []
        while len(out) < n_tokens:
            out += self.next_line()[1]
        return out
