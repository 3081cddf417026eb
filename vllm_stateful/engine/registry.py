"""The sessions: admission (budget, counts, context length), lookup, the
lifecycle (``SessionState``) and idle expiry.

One release path, :meth:`SessionRegistry.release`, is the only place a
session's budget and pin are given back: a close, an expiry, a create that
is rolled back and an engine death all go through it. It runs as its own
task, shielded from the caller's cancellation, and retries the CLOSE control
request (``release.py``); the session keeps counting against the budget
until the engine has acknowledged the CLOSE (so the budget never runs ahead
of the pins).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable, Iterator

from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.budget import Budget
from vllm_stateful.engine.journal import Journal
from vllm_stateful.engine.release import release_pins
from vllm_stateful.engine.rpc import EngineRPC
from vllm_stateful.engine.session import Session, SessionState
from vllm_stateful.errors import (
    ContextLengthError,
    InvalidInputError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
    TenantLimitError,
)

logger = logging.getLogger(__name__)

# How often the housekeeping loop looks for expired sessions, failed releases
# and a dead engine.
TICK_S = 0.5
# A failed release is retried this long after it failed.
RETRY_FAILED_S = 5.0
# How often the last use of sessions is written to the store.
JOURNAL_LAST_USED_S = 5.0


class SessionRegistry:
    def __init__(
        self, config: StatefulConfig, budget: Budget, rpc: EngineRPC, max_model_len: int,
        journal: Journal,
    ):  # fmt: skip
        self.config = config
        self.budget = budget
        self.rpc = rpc
        self.journal = journal
        self._journaled_at = 0.0
        # Called on every housekeeping pass with the monotonic time.
        self.on_tick: list[Callable[[float], None]] = []
        self.max_model_len = max_model_len
        # Open sessions (creating, active) by id.
        self.sessions: dict[str, Session] = {}
        # Ending sessions (closing, failed) by key: their pin may still be
        # held, so they keep their budget until the CLOSE is acknowledged.
        self.ending: dict[str, Session] = {}
        # Why recently closed sessions ended, so their ids get a clear error.
        self._ended: dict[str, str] = {}
        self._reaper: asyncio.Task | None = None
        self._engine_dead_seen = False

    # ---------------------------------------------------------------- admission

    def check_new(
        self, session_id: str, num_tokens: int, ttl_s: float | None, tenant: str = "default"
    ) -> None:
        if session_id in self.sessions:
            raise SessionExistsError(f"session '{session_id}' already exists")
        if len(self.sessions) >= self.config.max_sessions:
            raise InvalidInputError(f"too many sessions (max {self.config.max_sessions})")
        if ttl_s is not None and ttl_s <= 0:
            raise InvalidInputError("ttl_s must be positive")
        cap = self.config.tenant_max_sessions
        if cap is not None:
            mine = sum(1 for s in self.sessions.values() if s.tenant == tenant)
            if mine >= cap:
                raise TenantLimitError(
                    f"tenant '{tenant}' has {mine} open sessions; the per-tenant cap "
                    f"tenant_max_sessions (VLLM_STATEFUL_TENANT_MAX_SESSIONS) is {cap}"
                )
        self.check_grow(session_id, num_tokens, tenant)

    def check_grow(
        self, session_id: str, num_tokens: int, tenant: str | None = None,
        keeping: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        """May ``session_id`` hold ``num_tokens`` tokens? Raises if not.
        ``tenant``: the new session's (default: the existing session's).
        ``keeping``: sizes of other logs the session pins meanwhile (a slide
        keeps the previous log while it builds the window), budgeted too."""
        self.check_fits(session_id, num_tokens)
        me = self.sessions.get(session_id)
        if tenant is None:
            tenant = me.tenant if me is not None else "default"
        cap = self.config.tenant_max_tokens
        if cap is not None:
            theirs = self.budget.used(
                n for s in self.budgeted() if s is not me and s.tenant == tenant
                for n in s.resident_sizes()
            )  # fmt: skip
            need = self.budget.cost(num_tokens) + self.budget.used(keeping)
            if theirs + need > cap:
                raise TenantLimitError(
                    f"tenant '{tenant}' would pin {theirs + need} KV tokens (session "
                    f"'{session_id}' {need}, its other sessions {theirs}); the per-tenant cap "
                    f"tenant_max_tokens (VLLM_STATEFUL_TENANT_MAX_TOKENS) is {cap}"
                )
        # Offloaded sessions hold no KV in the pool (engine/residency.py).
        others = self.budget.used(
            n for s in self.budgeted() if s is not me for n in s.resident_sizes()
        )
        self.budget.check(others + self.budget.used(keeping), num_tokens, session_id)

    def budgeted(self) -> Iterator[Session]:
        """Every session that counts against the budget: open ones, and
        ending ones whose CLOSE the engine has not acknowledged yet."""
        yield from list(self.sessions.values())
        yield from list(self.ending.values())

    def check_fits(self, session_id: str, num_tokens: int) -> None:
        # A request needs at least one free position to generate a token.
        if num_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"session '{session_id}' would hold {num_tokens} tokens; the model's "
                f"context window (max_model_len) is {self.max_model_len}"
            )

    def check_limit(self, session: Session, num_tokens: int) -> None:
        """A session with ``overflow="reject"`` and its own ``max_tokens``
        may not hold more (the model's limit is ``check_fits``)."""
        if session.max_tokens is not None and num_tokens > session.max_tokens:
            raise ContextLengthError(
                f"session '{session.id}' would hold {num_tokens} tokens; its max_tokens is "
                f"{session.max_tokens} (overflow 'reject')"
            )

    def flash_count(self) -> int:
        return sum(len(s.flash) for s in self.sessions.values())

    # ---------------------------------------------------------------- lifecycle

    def add(self, session: Session) -> None:
        """Register a session being created (``creating``) or restored
        (``restoring``)."""
        assert session.state in (SessionState.CREATING, SessionState.RESTORING)
        self._ended.pop(session.id, None)
        self.sessions[session.id] = session
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._housekeeping())

    def activate(self, session: Session) -> None:
        """The prefix (or a restored session's stored versions) is ingested:
        ``creating`` / ``restoring`` -> ``active``."""
        if session.state not in (SessionState.CREATING, SessionState.RESTORING):
            raise SessionClosedError(f"session '{session.id}' was {session.closed_reason}")
        session.state = SessionState.ACTIVE

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            if session_id in self._ended:
                raise SessionClosedError(f"session '{session_id}' is {self._ended[session_id]}")
            raise SessionNotFoundError(f"session '{session_id}' not found")
        return session

    async def close(self, session_id: str, reason: str = "closed") -> None:
        """Close the session and release its pinned KV; returns once the
        release is over (closed, or failed and left for retry)."""
        await self.release(self.get(session_id), reason)

    async def release(self, session: Session, reason: str) -> None:
        """The release path (see the module docstring). Idempotent: a second
        call joins the first. Cancelling the caller does not stop it."""
        await asyncio.shield(self.begin_release(session, reason))

    def begin_release(self, session: Session, reason: str) -> asyncio.Task:
        """Start releasing ``session`` (``closing``) unless that has begun;
        returns the release task. Synchronous, so a caller being cancelled
        cannot leave a session half-ended."""
        if session.release_task is not None:
            return session.release_task
        session.state = SessionState.CLOSING
        session.closed_reason = reason
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
        self.ending[session.key] = session
        # Queued now, in order after the session's last append.
        forgotten = self.journal.ended(session, reason)
        self._ended[session.id] = reason
        if len(self._ended) > 10 * self.config.max_sessions:
            self._ended.pop(next(iter(self._ended)))
        session.release_task = asyncio.create_task(self._release(session, forgotten))
        return session.release_task

    async def _release(self, session: Session, forgotten: asyncio.Future | None = None) -> None:
        if await release_pins(self.rpc, session, forgotten):
            self.ending.pop(session.key, None)

    def retry_failed(self) -> list[asyncio.Task]:
        """Retry the release of every ``failed`` session now; returns the
        release tasks (await them to wait for the outcome)."""
        tasks = []
        for session in list(self.ending.values()):
            if session.state is SessionState.FAILED and session.release_task.done():
                session.state = SessionState.CLOSING
                session.release_task = asyncio.create_task(self._release(session))
                tasks.append(session.release_task)
        return tasks

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    async def _housekeeping(self) -> None:
        """Expire idle sessions, retry failed releases, end every session
        when the engine dies. Survives any error of one pass: a DELETE
        racing an expiry must never stop expiry."""
        while True:
            await asyncio.sleep(TICK_S)
            try:
                self._tick(time.monotonic())
            except Exception:  # noqa: BLE001 - logged; the next tick runs
                logger.exception("session housekeeping failed; continuing")

    def _tick(self, now: float) -> None:
        if not self.rpc.alive:
            if not self._engine_dead_seen:
                self._engine_dead_seen = True
                self._end_all(list(self.sessions.values()), "engine_dead")
            return
        self._end_all(
            [s for s in self.sessions.values() if s.state is SessionState.ACTIVE and s.expired(now)],
            "expired",
        )
        if now - self._journaled_at >= JOURNAL_LAST_USED_S:
            self._journaled_at = now
            self.journal.last_used(self.sessions.values())
        for hook in self.on_tick:
            hook(now)
        for session in list(self.ending.values()):
            failed_at = session.release_failed_at
            if session.state is SessionState.FAILED and now - (failed_at or now) >= RETRY_FAILED_S:
                self.retry_failed()
                break

    def _end_all(self, sessions: Iterable[Session], reason: str) -> None:
        for session in sessions:
            try:
                self.begin_release(session, reason)
            except Exception:  # noqa: BLE001 - one session must not stop the rest
                logger.exception("session '%s': could not start its release", session.id)
