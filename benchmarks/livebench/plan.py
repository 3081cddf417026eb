"""The schedule every engine replays: fixed before any engine runs a level.

A *slot* is one stream (one session at a time). Each slot replays its own
stretch of the tick day; its appends carry whole lines at times fixed by the
offered token rate (open loop: the schedule never waits for the server).
Questions arrive as a seeded Poisson process over all slots.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Sequence

HEADER = "E-mini S&P 500 futures trades, one line per trade (time price size):\n"


@dataclass(frozen=True)
class Question:
    id: str
    text: str
    ids: tuple[int, ...]
    flash: bool = False  # registered as a flash query on every session


# Completions that copy a number from the stream: the small instruct model
# answers these sensibly (it continues the sentence with the last line's
# fields), and they are what a dashboard would ask again and again.
QUESTION_TEXTS = (
    ("last_price", "\nThe last trade price was", True),
    ("last_time", "\nThe time of the last trade was", False),
    ("price_of_last", "\nThe price of the last trade was", False),
)


def questions(tokenizer: Any) -> list[Question]:
    return [
        Question(qid, text, tuple(tokenizer.encode(text, add_special_tokens=False)), flash)
        for qid, text, flash in QUESTION_TEXTS
    ]


class LineIds:
    """Feed lines tokenized one by one (no special tokens), exactly as a
    session tokenizes one append; cached, since every level replays the
    same day. Positions wrap around a short source (smoke runs)."""

    def __init__(self, tokenizer: Any, lines: Sequence[str]):
        self.tok, self.lines = tokenizer, lines
        self._cache: dict[int, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.lines)

    def __getitem__(self, i: int) -> tuple[int, ...]:
        i %= len(self.lines)
        ids = self._cache.get(i)
        if ids is None:
            ids = tuple(self.tok.encode(self.lines[i], add_special_tokens=False))
            self._cache[i] = ids
        return ids


@dataclass
class PlannedAppend:
    t: float  # seconds after the level starts
    lines: list[tuple[int, ...]]

    @property
    def tokens(self) -> int:
        return sum(len(x) for x in self.lines)

    def ids(self) -> list[int]:
        return [t for line in self.lines for t in line]


@dataclass
class PlannedQuestion:
    t: float
    slot: int
    qid: str


@dataclass
class LevelPlan:
    sessions: int
    load: float
    offered_tps: float  # over all slots
    duration_s: float
    header: list[int]
    prefix_lines: list[list[tuple[int, ...]]]  # per slot: lines of its first prefix
    appends: list[list[PlannedAppend]]  # per slot, in time order
    questions: list[PlannedQuestion]
    meta: dict[str, Any] = field(default_factory=dict)

    def prefix_ids(self, slot: int) -> list[int]:
        return self.header + [t for line in self.prefix_lines[slot] for t in line]

    @property
    def planned_tokens(self) -> int:
        return sum(a.tokens for slot in self.appends for a in slot)


def window(header: list[int], lines: Sequence[tuple[int, ...]], tokens: int) -> list[int]:
    """Header + the newest whole lines that fit ``tokens`` (a rotated
    session starts from the recent past of its stream)."""
    out: list[tuple[int, ...]] = []
    n = len(header)
    for line in reversed(lines):
        if n + len(line) > tokens:
            break
        out.append(line)
        n += len(line)
    return header + [t for line in reversed(out) for t in line]


def plan_level(
    *,
    source: LineIds,
    header: list[int],
    sessions: int,
    load: float,
    capacity_tps: float,
    duration_s: float,
    start_context: int,
    lines_per_append: int,
    question_rate: float,
    qids: Sequence[str],
    seed: int,
    first_line: int = 0,
    rotate_at: int | None = None,
    flash_reads: tuple[str, float] | None = None,
) -> LevelPlan:
    """Appends of ``lines_per_append`` lines per slot, spaced so that the
    slots together offer ``load * capacity_tps`` tokens/s; questions at
    Poisson times (``question_rate`` per second over all slots), each on a
    random slot, a random question. ``flash_reads`` (a flash question's id,
    a rate) adds a dashboard reading that flash answer at Poisson times,
    on a random slot: reads are what flash queries are for, and enough of
    them make the hit rate a measurement.

    With ``rotate_at`` (streams move to a fresh session of ``start_context``
    tokens before passing it), the load counts the rotations too: the
    engine ingests every fresh session's window again, ``start_context``
    tokens for every ``rotate_at - start_context`` appended, so the feed
    gets the share of the load that leaves room for them; and the slots'
    first contexts are spread between the two (``stagger``), so the mix of
    contexts, and with it the cost of a token, stays the same over the run
    instead of growing until every stream rotates at once."""
    rng = random.Random(f"{seed}:{sessions}:{load}")
    feed_load = load if rotate_at is None else load * feed_share(start_context, rotate_at)
    offered = feed_load * capacity_tps
    per_slot = offered / sessions
    stride = max(1, len(source) // max(sessions, 1))
    prefix_lines, appends = [], []
    for s in range(sessions):
        pos = first_line + s * stride
        lines: list[tuple[int, ...]] = []
        n = len(header)
        while n < start_context:
            lines.append(source[pos])
            n += len(source[pos])
            pos += 1
        prefix_lines.append(lines)
        # A random phase per slot, so slots do not append in lockstep.
        t = rng.uniform(0, lines_per_append * 20 / per_slot)
        slot: list[PlannedAppend] = []
        while t < duration_s:
            chunk = [source[pos + i] for i in range(lines_per_append)]
            pos += lines_per_append
            a = PlannedAppend(t, chunk)
            slot.append(a)
            t += a.tokens / per_slot
        appends.append(slot)
    qs: list[PlannedQuestion] = []
    t = rng.expovariate(question_rate)
    while t < duration_s:
        qs.append(PlannedQuestion(t, rng.randrange(sessions), rng.choice(list(qids))))
        t += rng.expovariate(question_rate)
    if flash_reads is not None:
        qid, rate = flash_reads
        frng = random.Random(f"{seed}:{sessions}:{load}:flash")
        t = frng.expovariate(rate)
        while t < duration_s:
            qs.append(PlannedQuestion(t, frng.randrange(sessions), qid))
            t += frng.expovariate(rate)
        qs.sort(key=lambda q: q.t)
    plan = LevelPlan(sessions, load, offered, duration_s, list(header), prefix_lines, appends, qs,
                     meta={"feed_load": feed_load, "rotate_at": rotate_at})  # fmt: skip
    if rotate_at is not None:
        stagger(plan, source, start_context, rotate_at, first_line)
    return plan


def feed_share(start_context: int, rotate_at: int) -> float:
    """The share of the ingestion a rotating stream's appends make: per
    cycle it appends ``rotate_at - start_context`` tokens and the engine
    ingests ``start_context`` more for the fresh session's window."""
    return (rotate_at - start_context) / rotate_at


def stagger(plan: LevelPlan, source: LineIds, start_context: int, rotate_at: int,
            first_line: int = 0) -> None:  # fmt: skip
    """Spread the streams' first contexts evenly between ``start_context``
    and ``rotate_at``, so that they rotate one after another instead of all
    at once: slot ``s`` starts with the lines before its stretch of the day
    prepended."""
    n = plan.sessions
    stride = max(1, len(source) // max(n, 1))  # where plan_level starts each slot
    for s in range(n):
        extra = (rotate_at - start_context) * s // n
        earlier: list[tuple[int, ...]] = []
        pos = first_line + s * stride - 1
        while sum(map(len, earlier)) < extra:
            earlier.append(source[pos])
            pos -= 1
        plan.prefix_lines[s] = earlier[::-1] + plan.prefix_lines[s]
