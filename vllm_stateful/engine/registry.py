"""The open sessions: admission (budget, counts, context length), lookup,
closing and idle expiry. The only place a session's budget and pin are given
back is :meth:`SessionRegistry.close`."""

from __future__ import annotations

import asyncio
import logging
import time

from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.budget import Budget
from vllm_stateful.engine.rpc import EngineRPC
from vllm_stateful.engine.session import Session, SessionEvent
from vllm_stateful.errors import (
    ContextLengthError,
    InvalidInputError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
)
from vllm_stateful.protocol import Op

logger = logging.getLogger(__name__)


class SessionRegistry:
    def __init__(self, config: StatefulConfig, budget: Budget, rpc: EngineRPC, max_model_len: int):
        self.config = config
        self.budget = budget
        self.rpc = rpc
        self.max_model_len = max_model_len
        self.sessions: dict[str, Session] = {}
        # Why recently closed sessions ended, so their ids get a clear error.
        self._ended: dict[str, str] = {}
        self._reaper: asyncio.Task | None = None

    # ---------------------------------------------------------------- admission

    def check_new(self, session_id: str, num_tokens: int, ttl_s: float | None) -> None:
        if session_id in self.sessions:
            raise SessionExistsError(f"session '{session_id}' already exists")
        if len(self.sessions) >= self.config.max_sessions:
            raise InvalidInputError(f"too many sessions (max {self.config.max_sessions})")
        if ttl_s is not None and ttl_s <= 0:
            raise InvalidInputError("ttl_s must be positive")
        self.check_grow(session_id, num_tokens)

    def check_grow(self, session_id: str, num_tokens: int) -> None:
        """May ``session_id`` hold ``num_tokens`` tokens? Raises if not."""
        self.check_fits(session_id, num_tokens)
        others = self.budget.used(
            len(s.tokens) for s in self.sessions.values() if s.id != session_id
        )
        self.budget.check(others, num_tokens, session_id)

    def check_fits(self, session_id: str, num_tokens: int) -> None:
        # A request needs at least one free position to generate a token.
        if num_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"session '{session_id}' would hold {num_tokens} tokens; the model's "
                f"context window (max_model_len) is {self.max_model_len}"
            )

    def flash_count(self) -> int:
        return sum(len(s.flash) for s in self.sessions.values())

    # ---------------------------------------------------------------- lifecycle

    def add(self, session: Session) -> None:
        self._ended.pop(session.id, None)
        self.sessions[session.id] = session
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_expired())

    def get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            if session_id in self._ended:
                raise SessionClosedError(f"session '{session_id}' is {self._ended[session_id]}")
            raise SessionNotFoundError(f"session '{session_id}' not found")
        return session

    async def close(self, session_id: str, reason: str = "closed") -> None:
        """Close the session and release its pinned KV."""
        session = self.get(session_id)
        session.closed_reason = reason
        del self.sessions[session_id]
        self._ended[session_id] = reason
        if len(self._ended) > 10 * self.config.max_sessions:
            self._ended.pop(next(iter(self._ended)))
        if session.ingest_task is not None:
            session.ingest_task.cancel()
        # The connector releases the pin and refuses to pin this key again, so
        # an append that finishes after this still leaves nothing behind.
        await self.rpc.control(session.key, Op.CLOSE)
        session.pinned_tokens = 0
        async with session.changed:
            session.changed.notify_all()
        kind = "evicted" if reason != "closed" else "closed"
        session.publish(SessionEvent(kind, session.version, {"reason": reason}))

    def stop(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for session in [s for s in self.sessions.values() if s.expired(now)]:
                await self.close(session.id, reason="expired")
