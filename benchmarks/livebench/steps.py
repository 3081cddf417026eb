"""Where the engine's time went during a level, from vllm-stateful's step
trace (``VLLM_STATEFUL_STEP_TRACE``: one JSON line per step with its end on
the system-wide monotonic clock, its duration and, per request, its class).

A question's latency under load is its own steps (about its idle latency)
plus the step already running when it arrives: a step cannot be cut short,
so a question arriving at a random moment of a busy engine waits for the
rest of it. The trace gives both the engine's busy share and that wait per
question, which is what sets how close to idle a question can be.
"""

from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from vllm_stateful.kv.lanes import Lane


@dataclass(frozen=True)
class TraceStep:
    start: float  # time.monotonic(), system-wide
    end: float
    lanes: frozenset[int]  # the request classes it carried


def read(path: Path, t0: float, t1: float) -> list[TraceStep]:
    """The steps of the trace that overlap [t0, t1), in order."""
    out = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            try:
                end, duration, requests, _lag = json.loads(line)
            except ValueError:  # a line cut short by the engine's exit
                continue
            if end > t0 and end - duration < t1:
                out.append(TraceStep(end - duration, end, frozenset(r[0] for r in requests)))
    out.sort(key=lambda s: s.end)
    return out


def kind(lanes: frozenset[int]) -> str:
    if Lane.FOREGROUND in lanes:
        return "questions"
    if Lane.FLASH in lanes:
        return "flash + ingestion" if Lane.INGEST in lanes else "flash"
    return "ingestion"


def engine_time(steps: list[TraceStep], t0: float, t1: float,
                arrivals: Iterable[float]) -> dict[str, Any]:  # fmt: skip
    """Busy share of [t0, t1) in all and by kind of step, and for each
    arrival (a question sent, on the same clock) how long the step then in
    flight still ran (0 when the engine was idle)."""
    span = t1 - t0
    by_kind: dict[str, float] = {}
    durations: dict[str, list[float]] = {}
    for s in steps:
        overlap = min(s.end, t1) - max(s.start, t0)
        if overlap > 0:
            by_kind[kind(s.lanes)] = by_kind.get(kind(s.lanes), 0.0) + overlap
            durations.setdefault(kind(s.lanes), []).append(s.end - s.start)
    ends = [s.end for s in steps]
    waits = []
    behind: dict[str, list[float]] = {}  # waits by the kind of step waited for
    for t in arrivals:
        i = bisect.bisect_right(ends, t)  # the first step ending after t
        if i < len(steps) and steps[i].start <= t:
            waits.append(steps[i].end - t)
            behind.setdefault(kind(steps[i].lanes), []).append(waits[-1])
        else:
            waits.append(0.0)
    return {
        "busy_share": sum(by_kind.values()) / span if span > 0 else None,
        "busy_share_by_kind": {k: v / span for k, v in sorted(by_kind.items())} if span > 0 else {},
        "steps": sum(len(d) for d in durations.values()),
        "step_p50_s_by_kind": {k: statistics.median(d) for k, d in sorted(durations.items())},
        # Per kind of step in flight: (questions that waited for one, mean wait).
        "waited_behind": {k: (len(w), statistics.fmean(w)) for k, w in sorted(behind.items())},
        "arrivals": len(waits),
        "arrived_busy_share": sum(w > 0 for w in waits) / len(waits) if waits else None,
        "in_flight_wait_p50_s": statistics.median(waits) if waits else None,
        "in_flight_wait_mean_s": statistics.fmean(waits) if waits else None,
        "in_flight_waits_s": [round(w, 4) for w in waits],
    }
