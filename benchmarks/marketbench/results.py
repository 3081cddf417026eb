"""What a run records, and the summaries the report is built from.

Times are seconds; ``t`` fields count from the start of their workload run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class QueryRecord:
    row: str  # engine row, e.g. "vllm-stateful" or "vLLM, prefix caching on"
    workload: str
    session: int
    step: int  # the append the question follows
    ask: int  # index among that step's questions
    question: str  # question id
    bucket: int  # nominal context size
    context: int  # tokens before the question
    prompt_tokens: int  # context + question
    t: float
    e2e_s: float
    ttft_s: float | None = None  # streamed answers only
    completion_tokens: int = 0
    text: str = ""
    token_ids: list[int] | None = None
    computed_tokens: int | None = None  # prompt tokens the engine computed, when reported
    flash: bool | None = None  # answered from the flash cache
    flash_wait_s: float | None = None  # waited for the flash answer of this version
    server_s: float | None = None  # server-side time (to first token when streamed), if reported
    pending_ingest: bool | None = (
        None  # sessions: the newest append was not yet ingested when asked
    )
    error: str | None = None

    @property
    def key(self) -> tuple[str, int, int, int]:
        """Identifies the same question of the same plan across engines."""
        return (self.workload, self.session, self.step, self.ask)


@dataclass
class AppendRecord:
    row: str
    workload: str
    session: int
    version: int
    tokens: int
    t: float  # when the append was acknowledged
    ingested_t: float | None = None  # first `ingested` event covering it

    @property
    def lag_s(self) -> float | None:
        return None if self.ingested_t is None else max(self.ingested_t - self.t, 0.0)


@dataclass
class ChurnRecord:
    row: str
    workload: str
    t: float
    prompt_tokens: int
    e2e_s: float | None
    error: str | None = None


@dataclass
class RunRecord:
    """One engine row over one workload."""

    row: str
    workload: str
    wall_s: float
    questions: int
    answered: int
    stream_tokens: int  # tokens appended by all sessions
    peak_rss_bytes: int
    pinned_tokens: int | None  # sum over sessions at their largest (sessions only)
    prefix_cache_queries: float | None = None  # vLLM counters over the run (tokens)
    prefix_cache_hits: float | None = None
    churn_sent: int = 0
    churn_skipped: int = 0  # not sent: too many churn requests already in flight
    notes: list[str] = field(default_factory=list)

    @property
    def prefix_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries:
            return None
        return (self.prefix_cache_hits or 0.0) / self.prefix_cache_queries


@dataclass
class EngineRecord:
    key: str
    label: str
    rows: list[str]
    status: str  # "ran" | "not runnable here" | "failed" | "not selected"
    reason: str | None = None
    precision: str | None = None
    configuration: str | None = None
    startup_s: float | None = None
    version: str | None = None


@dataclass
class Results:
    meta: dict[str, Any]
    engines: list[EngineRecord] = field(default_factory=list)
    runs: list[RunRecord] = field(default_factory=list)
    queries: list[QueryRecord] = field(default_factory=list)
    appends: list[AppendRecord] = field(default_factory=list)
    churn: list[ChurnRecord] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "meta": self.meta,
            "engines": [asdict(e) for e in self.engines],
            "runs": [asdict(r) for r in self.runs],
            "queries": [asdict(q) for q in self.queries],
            "appends": [asdict(a) for a in self.appends],
            "churn": [asdict(c) for c in self.churn],
        }
        path.write_text(json.dumps(body, indent=1) + "\n")

    @classmethod
    def read(cls, path: Path) -> Results:
        raw = json.loads(path.read_text())
        return cls(
            meta=raw["meta"],
            engines=[EngineRecord(**e) for e in raw["engines"]],
            runs=[RunRecord(**r) for r in raw["runs"]],
            queries=[QueryRecord(**q) for q in raw["queries"]],
            appends=[AppendRecord(**a) for a in raw["appends"]],
            churn=[ChurnRecord(**c) for c in raw["churn"]],
        )

    def rows(self) -> list[str]:
        return list(dict.fromkeys(q.row for q in self.queries))

    def select(self, row: str | None = None, workload: str | None = None,
               bucket: int | None = None) -> list[QueryRecord]:  # fmt: skip
        return [
            q for q in self.queries
            if q.error is None
            and (row is None or q.row == row)
            and (workload is None or q.workload == workload)
            and (bucket is None or q.bucket == bucket)
        ]  # fmt: skip


def percentile(values: Iterable[float], p: float) -> float | None:
    """Linear-interpolated percentile (``p`` in 0..100); None when empty."""
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
