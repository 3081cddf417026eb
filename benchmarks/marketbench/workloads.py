"""Workloads and their replay plans.

A plan fixes, before any engine runs, every token each session will see and
the point of every question: each engine replays the same plan, so all of
them answer the same questions on the same token sequences.

Time is wall clock: a session appends ``ticks_per_append`` feed lines every
``interval_s`` (the workload's aggregate line rate shared by its sessions),
and asks each question at a random moment between two appends. A session
waits for its answer before it goes on (a closed loop, as an agent watching
the feed would): a slow engine stretches the replay instead of answering
about data it was never sent, which keeps the contexts identical.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from marketbench.feed import LineTokens, line_format, lines
from marketbench.questions import Question, QuestionSet

# Sessions replay stretches of the feed this many lines apart, so that no
# two sessions see the same (real) data; 81 sessions fit in the 500,000 ticks.
SESSION_STRIDE_LINES = 5_000


@dataclass(frozen=True)
class Workload:
    name: str  # short id used on the command line: a, b8, c32, ...
    title: str
    sessions: int
    buckets: tuple[int, ...]  # nominal context sizes (tokens) where questions fall
    questions_per_bucket: int  # per session
    churn: bool = False  # background stateless traffic


def default_workloads(max_context: int = 7000, wide_context: int = 2000) -> dict[str, Workload]:
    """The issue's workloads. 32 sessions grow to ``wide_context`` tokens
    (32 x 7k tokens of pinned KV would not fit beside the other engines'
    caches on a 24 GiB machine, and stock engines would take hours)."""
    deep = tuple(b for b in (500, 1000, 2000, 3000, 4000, 5000, 6000, 7000) if b < max_context)
    deep = deep + (max_context,)
    wide = tuple(b for b in deep if b < wide_context) + (wide_context,)
    return {
        "a": Workload("a", f"1 session, context ~0 to ~{max_context // 1000}k", 1, deep, 5),
        "b8": Workload("b8", "8 concurrent sessions", 8, deep, 1),
        "b32": Workload("b32", "32 concurrent sessions", 32, wide, 1),
        "c8": Workload("c8", "8 sessions + stateless churn", 8, deep, 1, churn=True),
        "c32": Workload("c32", "32 sessions + stateless churn", 32, wide, 1, churn=True),
    }


@dataclass(frozen=True)
class Ask:
    question: Question
    bucket: int  # nominal context
    offset: float  # fraction of the append interval waited before asking


@dataclass
class Step:
    text: str  # one append: whole feed lines
    tokens: list[int]  # each line tokenized on its own, concatenated
    asks: list[Ask] = field(default_factory=list)  # asked after it


@dataclass
class SessionPlan:
    index: int
    prefix_text: str
    prefix: list[int]  # tokenized with special tokens, as a session does
    steps: list[Step]
    interval_s: float
    start_delay_s: float  # sessions start staggered, not in lockstep

    def questions(self) -> list[Question]:
        """Distinct questions this session asks, in first-asked order."""
        seen: dict[str, Question] = {}
        for step in self.steps:
            for ask in step.asks:
                seen.setdefault(ask.question.id, ask.question)
        return list(seen.values())

    @property
    def num_asks(self) -> int:
        return sum(len(s.asks) for s in self.steps)


@dataclass(frozen=True)
class FeedConfig:
    csv_path: str | None = None
    bar_seconds: float | None = None
    tick_rate: float = 10.0  # feed lines per second, over all sessions of a workload
    ticks_per_append: int = 3
    jitter: float = 0.05  # question context within +-5% of its bucket


def plan_workload(
    w: Workload,
    tokenizer: Any,
    qset: QuestionSet,
    feed: FeedConfig,
    seed: int,
    first_session: int = 0,
    stride_lines: int = SESSION_STRIDE_LINES,
) -> list[SessionPlan]:
    """Plans of ``w``'s sessions. Session ``i`` replays the feed from line
    ``(first_session + i) * stride_lines``: give every workload its own
    ``first_session`` so that no two sessions of a run share data (a prefix
    cache must not serve one workload from another's leftovers)."""
    rng = random.Random(f"{seed}-{w.name}")
    unit = f"{feed.bar_seconds:g}-second bar" if feed.bar_seconds else "trade"
    prefix_text = qset.context_text(unit, line_format(feed.bar_seconds))
    prefix = tokenizer.encode(prefix_text, add_special_tokens=True)
    per_session_rate = feed.tick_rate / w.sessions
    interval = feed.ticks_per_append / per_session_rate
    plans = []
    for i in range(w.sessions):
        skip = (first_session + i) * stride_lines
        source = LineTokens(tokenizer, lines(feed.csv_path, feed.bar_seconds), start=skip)
        targets = sorted(
            (int(b * rng.uniform(1 - feed.jitter, 1 + feed.jitter)), b)
            for b in w.buckets
            for _ in range(w.questions_per_bucket)
        )
        steps: list[Step] = []
        context = len(prefix)
        for target, bucket in targets:
            # Append until the context reaches the target, then ask there.
            while not steps or context < target:
                text, chunk = "", []
                for _ in range(feed.ticks_per_append):
                    line, ids = source.next_line()
                    text, chunk = text + line, chunk + ids
                steps.append(Step(text, chunk))
                context += len(chunk)
            q = rng.choice(qset.questions)
            steps[-1].asks.append(Ask(q, bucket, rng.random()))
        plans.append(
            SessionPlan(i, prefix_text, list(prefix), steps, interval, interval * i / w.sessions)
        )
    return plans


def context_at(plan: SessionPlan, step_index: int) -> int:
    return len(plan.prefix) + sum(len(s.tokens) for s in plan.steps[: step_index + 1])
