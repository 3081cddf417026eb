"""The sessions: admission (budget, counts, context length), lookup, the
lifecycle (``SessionState``) and idle expiry.

One release path, :meth:`SessionRegistry.release`, is the only place a
session's budget and pin are given back: a close, an expiry, a create that
is rolled back and an engine death all go through it. It runs as its own
task, shielded from the caller's cancellation, and retries the CLOSE control
request; the session keeps counting against the budget until the engine has
acknowledged the CLOSE (so the budget never runs ahead of the pins).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Iterable, Iterator

from vllm_stateful import metrics
from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.budget import Budget
from vllm_stateful.engine.journal import Journal
from vllm_stateful.engine.rpc import EngineRPC
from vllm_stateful.engine.session import Session, SessionEvent, SessionState
from vllm_stateful.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidInputError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
    TenantLimitError,
)
from vllm_stateful.protocol import Op

logger = logging.getLogger(__name__)

# CLOSE attempts per release, and the pause before each retry.
CLOSE_RETRY_DELAYS_S = (0.1, 0.5, 2.0)
# How often the housekeeping loop looks for expired sessions, failed releases
# and a dead engine.
TICK_S = 0.5
# A failed release is retried this long after it failed.
RETRY_FAILED_S = 5.0
# How often the last use of sessions is written to the store.
JOURNAL_LAST_USED_S = 5.0
# How long a release waits for the session's ingestion to stop (its engine
# request aborted) before it sends CLOSE anyway.
STOP_INGEST_S = 5.0


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
        # A slide in flight stops first (it never swaps an ending session),
        # then every ingestion: the session's and the window's.
        window = session.window
        for task in (session.slide_task, session.ingest_task, window and window.ingest_task):
            if task is not None and not task.done():
                # Abort its engine request before CLOSE is sent, so no append
                # of this session is still running when the pin is dropped
                # (the connector also refuses to pin a key closed meanwhile).
                task.cancel()
                await asyncio.wait({task}, timeout=STOP_INGEST_S)
        async with session.changed:
            session.changed.notify_all()  # waiters see the session ending
        released = await self.send_close(session, session.key)
        # A window being built and keys a slide retired hold pins too.
        extra = ([window.key] if window is not None else []) + list(session.retiring)
        for key in extra:
            if await self.send_close(session, key):
                session.retiring.pop(key, None)
                if window is not None and key == window.key:
                    session.window = None
            else:
                released = False
        if forgotten is not None:
            # Deleted from the store before the close returns (a failure is
            # logged by the store; the session is then restored on restart).
            await asyncio.wait({forgotten})
        reason = session.closed_reason or "closed"
        if released:
            session.state = SessionState.CLOSED
            session.pinned_tokens = 0
            self.ending.pop(session.key, None)
        else:
            session.state = SessionState.FAILED
            session.release_failed_at = time.monotonic()
            metrics.RELEASE_FAILURES.inc()
            logger.error(
                "session '%s': the engine did not acknowledge CLOSE; its %d pinned tokens "
                "stay budgeted and the release is retried", session.id, session.pinned_tokens,
            )
        if not session.announced_end:
            # Subscribers always learn that the session ended, even when the
            # pin could not be released yet (then it is retried).
            session.announced_end = True
            kind = "closed" if reason == "closed" else "evicted"
            session.publish(SessionEvent(kind, session.version, {"reason": reason}))
            session.subscribers.clear()

    async def send_close(self, session: Session, key: str) -> bool:
        """CLOSE ``key`` (the session's, or one a slide retired), retried;
        True once the engine acknowledged it (the pin is gone)."""
        for attempt, delay in enumerate((0.0, *CLOSE_RETRY_DELAYS_S)):
            if delay:
                await asyncio.sleep(delay)
            try:
                report = await self.rpc.control(key, Op.CLOSE)
            except EngineDeadError:
                return False  # the pins died with the engine; nothing to retry
            except Exception as exc:  # noqa: BLE001 - retried, then reported
                logger.warning("session '%s': CLOSE attempt %d failed: %r", session.id, attempt + 1, exc)
                continue
            assert report.session_pinned_tokens == 0, report
            return True
        return False

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
