"""The contract between the API-side session manager and the engine-side
KV connector: what travels in ``SamplingParams.extra_args`` and what comes back
in ``RequestOutput.kv_transfer_params``. Nothing else crosses the process
boundary, so both halves import only this module from each other.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

# Key in SamplingParams.extra_args (request -> engine) and in
# RequestOutput.kv_transfer_params (engine -> caller).
KEY = "vllm_stateful"
# In extra_args of a request that is not a session's: asks for an
# ``EngineReport`` anyway (its scheduling figures), for tests and benchmarks.
REPORT_KEY = "vllm_stateful_report"


class Op(str, enum.Enum):
    # Ingest the session's tokens and, when done, pin their KV blocks. With
    # ``RequestTag.data_tokens``, a flash question rides the chunk: the
    # prompt is the session's tokens and then the question, the output is
    # the question's answer, and only the session's tokens are pinned (as
    # soon as the prompt is computed, before the answer is decoded).
    APPEND = "append"
    # Read the session's KV; never changes the pin. A question someone waits
    # for (foreground work).
    QUERY = "query"
    # Same as QUERY for the KV, but a flash evaluation: background work that
    # yields to questions and ingestion.
    FLASH = "flash"
    # Release the session's pin (a one-token request carries it).
    CLOSE = "close"
    # Report block-pool figures only (a one-token request carries it).
    PROBE = "probe"
    # Copy the session's pinned KV out of the pool (host memory, then disk)
    # and release the pin; its next request loads it back.
    OFFLOAD = "offload"


@dataclass(frozen=True)
class RequestTag:
    """Request metadata: which session a request belongs to and why."""

    session: str
    op: Op
    # APPEND: when (wall clock) the oldest data this request ingests was
    # acknowledged. Appends made while a session's chunk runs wait on the
    # API side for the next one, so the engine sees the data's true age
    # (its ingestion lag) only from this, not from the request's arrival.
    since: float | None = None
    # APPEND with a flash question riding it: how many leading prompt tokens
    # are the session's (the rest is the question).
    data_tokens: int | None = None

    def to_extra_args(self) -> dict[str, Any]:
        raw: dict[str, Any] = {"session": self.session, "op": self.op.value}
        if self.since is not None:
            raw["since"] = self.since
        if self.data_tokens is not None:
            raw["data_tokens"] = self.data_tokens
        return {KEY: raw}

    @classmethod
    def from_extra_args(cls, extra_args: dict[str, Any] | None) -> RequestTag | None:
        raw = (extra_args or {}).get(KEY)
        if raw is None:
            return None
        return cls(
            session=raw["session"], op=Op(raw["op"]), since=raw.get("since"),
            data_tokens=raw.get("data_tokens"),
        )  # fmt: skip


@dataclass(frozen=True)
class EngineReport:
    """What the connector reports when a tagged request finishes.

    ``free_blocks`` is the pool's free count *after* the finishing request's
    own blocks are released, so it is comparable across reports.
    """

    free_blocks: int
    total_blocks: int
    block_size: int
    pinned_blocks: int  # over all sessions
    session_pinned_tokens: int  # this request's session
    tail_tokens_loaded: int  # copied from the pinned partial block
    # From the engine-side scheduler (kv/scheduler.py), when it is in use:
    # engine steps between the request's arrival and its first step, the
    # ingestion tokens computed in those steps, and the most ingestion tokens
    # that shared one of its own steps.
    waited_steps: int | None = None
    ingest_tokens_waited: int | None = None
    max_ingest_alongside: int | None = None
    # PROBE only: pinned tokens per session key, every pin the engine holds
    # (what ``StatefulEngine.reconcile`` compares with the API's accounting).
    pins: dict[str, int] | None = None

    def to_params(self) -> dict[str, Any]:
        return {KEY: asdict(self)}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> EngineReport | None:
        raw = (params or {}).get(KEY)
        return None if raw is None else cls(**raw)
