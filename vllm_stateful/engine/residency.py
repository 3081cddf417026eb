"""Which sessions hold their KV in vLLM's pool.

The budget bounds *resident* sessions only. A session idle for
``offload_idle_s``, or the least recently used ones when a create or an
append needs room, is offloaded: the engine copies its KV out of the pool
(host memory, then disk; ``kv/offload.py``) and drops the pin. Its next
question brings it back first (one engine request that loads the copy and
pins it again, computing one token); its next append simply ingests, and
that request loads the copy too. So the number of sessions is bounded by
host memory and disk, not by the pool.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

from vllm.logger import init_logger

from vllm_stateful import metrics
from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.budget import Budget
from vllm_stateful.engine.rpc import EngineRPC, one_token
from vllm_stateful.engine.session import Session, SessionEvent, SessionState
from vllm_stateful.errors import BudgetExceededError
from vllm_stateful.protocol import EngineReport, Op

logger = init_logger(f"vllm.{__name__}")


def movable(session: Session) -> bool:
    """Offloadable now: active, in the pool, nothing being ingested."""
    return (
        session.state is SessionState.ACTIVE
        and not session.offloaded
        and session.residency is None
        and (session.ingest_task is None or session.ingest_task.done())
        and session.ingested_version == session.version
        and session.window is None  # a slide holds two logs: it finishes first
        and not session.retiring
        and session.pinned_tokens > 0
    )


class Residency:
    def __init__(
        self, config: StatefulConfig, budget: Budget, rpc: EngineRPC,
        sessions: Callable[[], Iterable[Session]],
    ):  # fmt: skip
        self.config = config
        self.budget = budget
        self.rpc = rpc
        self._sessions = sessions  # every session that counts against the budget

    def resident_tokens(self, excluding: Session | None = None) -> int:
        return self.budget.used(
            n for s in self._sessions() if s is not excluding for n in s.resident_sizes()
        )

    async def offload(self, session: Session) -> bool:
        """Move the session's KV out of the pool; False if it was not
        movable (busy, ending, already out)."""
        if not movable(session):
            return False
        done = session.residency = asyncio.get_running_loop().create_future()
        try:
            report = await self.rpc.control(session.key, Op.OFFLOAD)
            assert report.session_pinned_tokens == 0, report
            session.offloaded = True
            session.offloaded_tokens = session.pinned_tokens
            session.pinned_tokens = 0
        finally:
            session.residency = None
            done.set_result(None)
        metrics.OFFLOADS.inc()
        session.publish(SessionEvent("offloaded", session.ingested_version, {
            "tokens": session.offloaded_tokens,
        }))  # fmt: skip
        return True

    async def settle(self, session: Session) -> None:
        """Wait for an offload of this session in flight."""
        while session.residency is not None:
            await asyncio.shield(session.residency)

    async def bring_back(self, session: Session) -> None:
        """Make an offloaded session resident again before a question
        reads it: load its copy into the pool and pin it."""
        await self.settle(session)
        if not session.offloaded:
            return
        done = session.residency = asyncio.get_running_loop().create_future()
        try:
            await self.make_room(session, session.offloaded_tokens)
            # Within the budget, or not at all (pins past it could starve the
            # engine): the question fails and the session stays out.
            self.budget.check(self.resident_tokens(excluding=session), session.offloaded_tokens, session.id)
            prompt = session.tokens[: session.offloaded_tokens]
            out = await self.rpc.final(session.key, prompt, one_token(), Op.APPEND)
            report = EngineReport.from_params(out.kv_transfer_params)
            session.pinned_tokens = report.session_pinned_tokens if report else 0
            session.offloaded = False
            session.restore_computed_tokens = len(prompt) - (out.num_cached_tokens or 0)
        finally:
            session.residency = None
            done.set_result(None)
        metrics.OFFLOAD_RESTORES.inc()

    async def admit(self, check: Callable[[], None], me: Session | None, tokens: int) -> None:
        """Run the admission ``check`` (for ``me``, or a new session, holding
        ``tokens``); past the budget, make room by offloading idle sessions
        and run it again."""
        try:
            check()
        except BudgetExceededError:
            await self.make_room(me, tokens)
            check()

    async def make_room(self, me: Session | None, tokens: int) -> None:
        """Offload least recently used idle sessions until ``me`` (or a new
        session) can hold ``tokens`` within the budget. Leaves the check
        itself to the registry: if nothing can move, admission refuses as
        before."""
        if not self.config.offload or self.budget.cost(tokens) > self.budget.limit_tokens:
            return  # nothing to do, or nothing would help
        need = self.resident_tokens(excluding=me) + self.budget.cost(tokens) - self.budget.limit_tokens
        for other in sorted(self._sessions(), key=lambda s: s.last_used):
            if need <= 0:
                return
            if other is not me and await self.offload(other):
                need -= self.budget.cost(len(other.tokens))

    def sweep(self, now: float) -> None:
        """Offload sessions idle for ``offload_idle_s`` (housekeeping)."""
        idle_s = self.config.offload_idle_s
        if not self.config.offload or idle_s is None:
            return
        for session in list(self._sessions()):
            if now - session.last_used > idle_s and movable(session):
                task = asyncio.create_task(self.offload(session))
                task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.warning("offloading an idle session failed: %r", task.exception())
