"""Session bodies: create, stats, append, close and events."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from vllm_stateful.server.schemas.base import SESSION_ID_PATTERN, Open, Strict
from vllm_stateful.server.schemas.flash import FlashRequest


class CreateSessionRequest(Strict):
    """``POST /v1/sessions``. ``prefix`` text is tokenized with the model's
    special tokens (BOS); a list is taken as token ids verbatim."""

    prefix: str | list[int] = ""
    # URL-safe, so that every session can be named in a route's path.
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN, max_length=256)
    ttl_s: float | None = Field(default=None, gt=0)
    # Flash queries registered with the session, atomically.
    flash: list[FlashRequest] = Field(default_factory=list)
    # What an append past the session's limit does: "reject" (413) or
    # "slide" (the oldest appends are dropped; the prefix is kept). Checked
    # by the engine, which names the allowed values.
    overflow: str = "reject"
    # The most tokens the session holds (default: the model's max_model_len - 1).
    max_tokens: int | None = None


class CreateSessionResponse(Open):
    id: str
    token: str  # send as X-Session-Token on every route of this session
    tokens: int
    version: int


class SessionStats(Open):
    """``GET /v1/sessions/{id}``: the engine's view of one session."""

    object: Literal["session"] = "session"
    id: str
    tokens: int
    version: int
    ingested_version: int
    pending: int  # versions appended but not yet ingested
    pinned_tokens: int
    ingest_requests: int
    created_at: float  # unix time
    expires_at: float | None  # unix time; None: no TTL
    state: str = "active"  # creating | restoring | active (only open sessions are listed)
    ingested_tokens: int = 0  # tokens pinned (ingestion chunk ends included)
    backlog_tokens: int = 0  # appended but not yet ingested
    ingest_lag_s: float = 0.0  # age of the oldest un-ingested append; 0.0 when caught up
    ingest_rate_tps: float | None = None  # prompt tokens/s ingested, smoothed; None: not yet measured
    tenant: str = "default"  # from the tenant header at create (config tenant_header)
    replica: str | None = None  # the replica holding it when scaled out (vllm_stateful.scale)
    offloaded: bool = False  # KV out of the pool (host memory or disk); back on use
    overflow: str = "reject"  # reject | slide: what an append past max_tokens does
    max_tokens: int = 0  # the most tokens the session holds
    window_start_version: int = 0  # oldest version still held; 0 until a slide
    dropped_tokens: int = 0  # appended tokens dropped by slides, in total
    slides: int = 0
    sliding: bool = False  # the next window is being built (questions read the previous one)


class SessionList(Open):
    object: Literal["list"] = "list"
    data: list[SessionStats]


class AppendRequest(Strict):
    """``POST /v1/sessions/{id}/append``: exactly one of ``text`` (tokenized
    without special tokens) or ``token_ids``."""

    text: str | None = None
    token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> AppendRequest:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of 'text' or 'token_ids'")
        return self

    @property
    def data(self) -> str | list[int]:
        return self.text if self.text is not None else list(self.token_ids or [])


class AppendResponse(Open):
    version: int
    # Set when the request asked ``?wait=true``: the version now ingested.
    ingested_version: int | None = None


class CloseResponse(Open):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class SessionEvent(Open):
    """One server-sent event of ``GET /v1/sessions/{id}/events``."""

    type: str  # "ingested" | "flash" | "slid" | "offloaded" | "closed" | "evicted" | "dropped"
    session_id: str
    version: int
    data: dict[str, Any] = Field(default_factory=dict)
