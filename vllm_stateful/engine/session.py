"""A session: an append-only token log with versions, and its event fan-out.

Version ``v`` is the log's first ``lengths[v - first_version]`` tokens.
Version 0 is the prefix (with the tokenizer's BOS). ``ingested_version`` is
the newest version whose KV the engine holds pinned. ``first_version`` is 0
until the session slides (``overflow="slide"``, engine/window.py): the log is
then the prefix plus the appends from ``first_version`` on, and versions keep
counting up (a version number is never reused).

A session's life (``SessionState``)::

    creating --prefix ingested--> active --close/expiry--> closing --CLOSE acked--> closed
        |                           ^                        |
        +--prefix failed /          |                        +--CLOSE failed--> failed --retry--> closed
        |  caller gone--> closing   |
    restoring --stored versions ingested (after a restart, engine/recovery.py)

Only ``SessionRegistry`` moves a session past ``active``; budget and pin are
given back in one place (its release path).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vllm_stateful.engine.flash_query import FlashQuery, FlashResult


class SessionState(str, enum.Enum):
    CREATING = "creating"  # registered, prefix not yet ingested
    # Read back from the store after a restart; its KV is being rebuilt.
    RESTORING = "restoring"
    ACTIVE = "active"
    # Ending: no new work; still counts against the budget, because the
    # engine may hold its pin until it acknowledged the CLOSE.
    CLOSING = "closing"
    CLOSED = "closed"  # the engine dropped the pin
    FAILED = "failed"  # CLOSE not acknowledged; retried, still budgeted

    @property
    def open(self) -> bool:
        return self in (SessionState.CREATING, SessionState.RESTORING, SessionState.ACTIVE)


def token_hash(access_token: str) -> str:
    """What is kept of a session's access token (and what is compared)."""
    return hashlib.sha256(access_token.encode()).hexdigest()


# A subscriber that lets this many events pile up is dropped (config
# ``max_event_queue``): one slow reader must not grow memory without limit.
DEFAULT_MAX_EVENT_QUEUE = 1024


@dataclass(frozen=True)
class SessionEvent:
    # "ingested" | "flash" | "slid" | "offloaded" | "closed" | "evicted" |
    # "dropped" (the last three end a subscription; "dropped" only for the
    # reader that fell behind)
    type: str
    version: int
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SessionStats:
    id: str
    tokens: int
    version: int
    ingested_version: int
    pending: int  # versions appended but not yet ingested
    pinned_tokens: int
    ingest_requests: int
    ingest_computed_tokens: int  # prompt tokens the engine computed to ingest
    created_at: float
    expires_at: float | None
    ingested_tokens: int  # tokens pinned (chunk ends included)
    backlog_tokens: int  # appended but not yet ingested
    ingest_lag_s: float  # age of the oldest un-ingested append; 0.0 when caught up
    ingest_rate_tps: float | None  # smoothed; None before the first measurement
    state: str = "active"  # SessionState value; stats exist for open sessions only
    tenant: str = "default"  # whose per-tenant caps the session counts against
    # KV out of vLLM's pool (host memory or disk); brought back on use.
    offloaded: bool = False
    # The context-overflow policy (engine/window.py) and what it has done.
    overflow: str = "reject"
    max_tokens: int = 0  # the most tokens the session holds (its limit)
    window_start_version: int = 0  # the oldest version still held (0: nothing dropped)
    dropped_tokens: int = 0  # appended tokens dropped by slides, in total
    slides: int = 0
    sliding: bool = False  # the next window is being built


# How many (version, ingested time) entries a session keeps for
# bounded-staleness flash reads: older answers are simply not served stale.
INGESTED_HISTORY = 256


@dataclass
class Session:
    id: str
    # Unique per session instance (ids may be reused after close): the
    # cache salt and the key the engine-side pin is filed under.
    key: str
    # Known only to the creator: the session keeps its hash (``token_hash``),
    # and a restored session has no token, only the hash.
    access_token: str | None
    tokens: list[int]
    ttl_s: float | None = None
    # The tenant whose caps (config tenant_max_sessions / _tokens) it counts against.
    tenant: str = "default"
    lengths: list[int] = field(default_factory=list)
    ingested_version: int = -1
    pinned_tokens: int = 0
    ingest_requests: int = 0
    ingest_computed_tokens: int = 0
    created_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    state: SessionState = SessionState.CREATING
    # Set when the session starts ending (closing): why it ended.
    closed_reason: str | None = None
    # The registry's release path (engine/registry.py) owns these three.
    release_task: asyncio.Task | None = None
    release_failed_at: float | None = None  # monotonic; state FAILED
    announced_end: bool = False  # subscribers got closed/evicted
    ingest_error: BaseException | None = None
    # Questions with consistency "ingested" wait for this version: 0, or the
    # version a restored session had when the server stopped.
    ready_version: int = 0
    token_hash: str = ""
    # The last use written to the store; None while it is not recorded.
    journaled_last_used: float | None = None
    # Offload (engine/residency.py): the KV is out of the pool (not
    # budgeted), how many tokens its copy holds, an offload or bring-back in
    # flight (done when the future is), and what the last bring-back computed.
    offloaded: bool = False
    offloaded_tokens: int = 0
    residency: asyncio.Future | None = None
    restore_computed_tokens: int | None = None
    ingest_task: asyncio.Task | None = None
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    subscribers: set[asyncio.Queue] = field(default_factory=set)
    max_event_queue: int = DEFAULT_MAX_EVENT_QUEUE
    flash: dict[str, FlashQuery] = field(default_factory=dict)
    # The newest answer per flash query; versions only move forward.
    flash_results: dict[str, FlashResult] = field(default_factory=dict)
    flash_dirty: set[str] = field(default_factory=set)
    # Flash id -> the newest version whose answer rides its ingestion
    # request (engine/flash_ride.py): not evaluated again.
    flash_rides: dict[str, int] = field(default_factory=dict)
    # Ingestion progress and pace (engine/ingest.py). Times are monotonic.
    ingested_tokens: int = 0
    ingest_rate_tps: float | None = None
    # (version, appended at) of versions not yet ingested, oldest first.
    unacked: deque = field(default_factory=deque)
    # (version, ingested at) of the versions ingested_version took, newest last.
    ingested_history: deque = field(default_factory=lambda: deque(maxlen=INGESTED_HISTORY))
    # Context overflow (engine/window.py, engine/slide.py). ``max_tokens``:
    # the session's own limit (None: the model's). ``first_version``: the
    # version ``lengths[0]`` is; ``prefix_len``: the prefix's tokens (-1:
    # ``lengths[0]``, set below).
    overflow: str = "reject"
    max_tokens: int | None = None
    limit: int = 0  # the most tokens the log may hold: max_tokens, or the model's
    first_version: int = 0
    prefix_len: int = -1
    dropped_tokens: int = 0
    slides: int = 0
    # While a slide builds the next window, its log (a session of its own
    # under a new key, never registered): appends go there, questions still
    # read this log. None otherwise.
    window: Session | None = None
    slide_task: asyncio.Task | None = None
    # Keys a slide retired whose pins the engine has not yet released, and
    # the tokens each holds in the pool (budgeted until the CLOSE is acked).
    retiring: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.access_token is not None:
            self.token_hash = token_hash(self.access_token)
        if not self.lengths:
            self.lengths = [len(self.tokens)]
        if self.prefix_len < 0:
            assert self.first_version == 0, "a slid log names its prefix length"
            self.prefix_len = self.lengths[0]
        self.unacked.append((self.version, time.monotonic()))

    @property
    def log_version(self) -> int:
        """The newest version of this log (the one ingested under ``key``)."""
        return self.first_version + len(self.lengths) - 1

    @property
    def version(self) -> int:
        """The newest version: a window being built holds the newest appends."""
        return self.window.version if self.window is not None else self.log_version

    def length_at(self, version: int) -> int:
        index = version - self.first_version
        assert 0 <= index < len(self.lengths), (version, self.first_version, len(self.lengths))
        return self.lengths[index]

    def resident_sizes(self) -> list[int]:
        """Token counts of the KV this session holds in vLLM's pool (what
        the budget counts): its log unless offloaded, a window being built,
        and the logs of keys retired but not yet released."""
        sizes = [] if self.offloaded else [len(self.tokens)]
        if self.window is not None:
            sizes.append(len(self.window.tokens))
        sizes.extend(self.retiring.values())
        return sizes

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None

    def tokens_at(self, version: int) -> list[int]:
        return self.tokens[: self.length_at(version)]

    def extend(self, token_ids: list[int]) -> int:
        if self.window is not None:  # a slide is building the newest log
            return self.window.extend(token_ids)
        self.tokens.extend(token_ids)
        self.lengths.append(len(self.tokens))
        self.unacked.append((self.version, time.monotonic()))
        return self.version

    @property
    def backlog_tokens(self) -> int:
        if self.window is not None:
            return self.window.backlog_tokens
        return len(self.tokens) - self.ingested_tokens

    def ingest_lag_s(self, now: float | None = None) -> float:
        if self.window is not None and not self.unacked:
            return self.window.ingest_lag_s(now)
        if not self.unacked:
            return 0.0
        return (time.monotonic() if now is None else now) - self.unacked[0][1]

    def touch(self) -> None:
        self.last_used = time.monotonic()

    @property
    def expires_at(self) -> float | None:
        if self.ttl_s is None:
            return None
        return time.time() + self.ttl_s - (time.monotonic() - self.last_used)

    def expired(self, now: float) -> bool:
        return self.ttl_s is not None and now - self.last_used > self.ttl_s

    def publish(self, event: SessionEvent) -> None:
        """Queue ``event`` for every subscriber. A subscriber with
        ``max_event_queue`` events unread gets a final ``dropped`` event
        instead and is removed, so a queue never holds more than
        ``max_event_queue + 1`` events. The session's own end (``closed``,
        ``evicted``) is always delivered: it is final too."""
        final = event.type in ("closed", "evicted")
        for queue in list(self.subscribers):
            if queue.qsize() >= self.max_event_queue and not final:
                self.subscribers.discard(queue)
                queue.put_nowait(SessionEvent("dropped", event.version, {
                    "reason": f"the reader fell behind: {queue.qsize()} events unread "
                              f"(max_event_queue {self.max_event_queue})",
                }))
            else:
                queue.put_nowait(event)

    def stats(self) -> SessionStats:
        return SessionStats(
            id=self.id,
            tokens=len(self.tokens),
            version=self.version,
            ingested_version=self.ingested_version,
            # ingested_version is -1 before the prefix is in: all pending.
            pending=self.version - self.ingested_version,
            pinned_tokens=self.pinned_tokens,
            ingest_requests=self.ingest_requests,
            ingest_computed_tokens=self.ingest_computed_tokens,
            created_at=self.created_at,
            expires_at=self.expires_at,
            ingested_tokens=self.ingested_tokens,
            backlog_tokens=self.backlog_tokens,
            ingest_lag_s=self.ingest_lag_s(),
            ingest_rate_tps=self.ingest_rate_tps,
            state=self.state.value,
            tenant=self.tenant,
            offloaded=self.offloaded,
            overflow=self.overflow,
            max_tokens=self.limit,
            window_start_version=self.first_version,
            dropped_tokens=self.dropped_tokens,
            slides=self.slides,
            sliding=self.window is not None,
        )
