"""What the engine-side scheduler remembers about its steps.

* ``StepLog``: per request, what it waited for from arrival to its first
  step (the connector reports it when the request finishes);
* ``Step``: what one step computed, by kind and by request class; it feeds
  the step-cost fit (``pacing.py``) once the step's time is known;
* ``StepTrace``: with ``VLLM_STATEFUL_STEP_TRACE=<file>``, one JSON line
  per step (end time, duration, per request its class, tokens and context,
  and the ingestion lag the scheduler saw). It is how question time is
  taken apart on a live engine: which steps a question waited for, what
  shared its steps, what they cost.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import IO

TRACE_ENV = "VLLM_STATEFUL_STEP_TRACE"


@dataclass
class RequestWait:
    """What one request waited for, from its arrival to its first step."""

    arrival_step: int
    first_step: int | None = None
    ingest_tokens_before: int = 0  # ingestion computed in steps it sat out
    passed_over: int = 0  # consecutive steps it was ready but not scheduled
    # Of those, the steps that carried foreground work: what it starves by
    # (steps it sat out by choice, with none, do not count).
    starving: int = 0
    # The most ingestion tokens that shared a step with this request.
    max_ingest_alongside: int = 0


class StepLog:
    """Per-request wait records, kept until the request finishes."""

    def __init__(self, limit: int = 4096):
        self.limit = limit
        self.waits: OrderedDict[str, RequestWait] = OrderedDict()

    def arrived(self, request_id: str, step: int) -> None:
        self.waits[request_id] = RequestWait(arrival_step=step)
        while len(self.waits) > self.limit:  # requests that never finished
            self.waits.popitem(last=False)

    def pop(self, request_id: str) -> RequestWait | None:
        return self.waits.pop(request_id, None)


@dataclass
class Step:
    """One scheduled step, as the cost fit and the trace see it."""

    started: float  # time.monotonic() when it was handed to the model
    prompt_tokens: int = 0  # tokens of prefill chunks
    decoding: int = 0  # requests decoding (one token plus their drafts)
    prefilling: int = 0  # requests computing a prefill chunk
    ingest_tokens: int = 0
    foreground: int = 0  # foreground requests scheduled
    # How long the oldest data in the engine had waited since it was
    # acknowledged, when the step was arranged (0 without ingestion).
    ingest_lag_s: float = 0.0
    # (lane, tokens scheduled, tokens computed once the step is done) per request.
    requests: list[tuple[int, int, int]] = field(default_factory=list)


class StepTrace:
    """JSON lines of finished steps: ``[end, duration_s, requests,
    ingest_lag_s]`` (``end``: ``time.monotonic()``, system-wide)."""

    def __init__(self, path: str):
        self._file: IO[str] = open(path, "a", buffering=1)  # noqa: SIM115 (lives with the engine)

    @classmethod
    def from_env(cls) -> StepTrace | None:
        path = os.environ.get(TRACE_ENV)
        return cls(path) if path else None

    def write(self, step: Step, ended: float) -> None:
        duration, lag = round(ended - step.started, 4), round(step.ingest_lag_s, 4)
        self._file.write(json.dumps([round(ended, 4), duration, step.requests, lag]) + "\n")
