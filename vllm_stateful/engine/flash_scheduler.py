"""When flash evaluations run: after every ingested version. With the
engine-side scheduler (``kv/scheduler.py``) they are sent at once and the
engine runs them after questions and ingestion; without it, only in idle
engine time.

Per (session, flash query) there is at most one pending evaluation, always on
the newest ingested version when it starts: versions that arrive while it
waits supersede older ones instead of queueing behind them. Sessions take
turns (round robin), so many sessions share the idle time fairly.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Awaitable, Callable

if TYPE_CHECKING:
    from vllm_stateful.engine.flash_query import FlashQuery
    from vllm_stateful.engine.session import Session

Evaluate = Callable[["Session", "FlashQuery"], Awaitable[None]]


@dataclass
class FlashScheduler:
    """Runs flash evaluations when no foreground request is in flight."""

    evaluate: Evaluate
    is_idle: Callable[[], bool]
    concurrency: int = 2
    poll_s: float = 0.005
    # The engine-side scheduler orders flash work after questions and
    # ingestion (kv/scheduler.py): evaluations are then sent at once and
    # paused inside the engine, never cancelled here.
    engine_orders: bool = False
    _ready: deque = field(default_factory=deque)  # sessions with dirty queries
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    # Running evaluations and what they evaluate, so they can be preempted.
    _running: dict[asyncio.Task, tuple[Session, str]] = field(default_factory=dict)
    _task: asyncio.Task | None = None

    def notify(self, session: Session, flash_ids: list[str] | None = None) -> None:
        """Mark flash queries dirty (all of the session's by default)."""
        ids = list(session.flash) if flash_ids is None else flash_ids
        if not ids:
            return
        was_idle = not session.flash_dirty
        session.flash_dirty.update(ids)
        if was_idle:
            self._ready.append(session)
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._loop())

    def preempt(self) -> None:
        """Foreground work arrived: cancel running evaluations (their engine
        requests are aborted) and mark them dirty again, so they rerun, on
        the newest version, in the next idle time instead of sharing engine
        steps with the foreground. A no-op when the engine orders the work."""
        if self.engine_orders:
            return
        for task, (session, flash_id) in list(self._running.items()):
            task.cancel()
            self.notify(session, [flash_id])

    def stop(self) -> None:
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()

    async def _loop(self) -> None:
        while True:
            if not self._ready:
                self._wake.clear()
                await self._wake.wait()
                continue
            # Wait for idle engine time (foreground requests always go first)
            # and for a free evaluation slot.
            busy = not self.engine_orders and not self.is_idle()
            if len(self._running) >= self.concurrency or busy:
                await asyncio.sleep(self.poll_s)
                continue
            session = self._ready.popleft()
            flash_id = self._next(session)
            if flash_id is None:
                continue
            task = asyncio.create_task(self.evaluate(session, session.flash[flash_id]))
            self._running[task] = (session, flash_id)
            task.add_done_callback(lambda t: self._running.pop(t, None))

    def _next(self, session: Session) -> str | None:
        """Pop one dirty query of the session; requeue the session at the
        back if it has more (round robin)."""
        flash_id = None
        while session.flash_dirty and flash_id is None:
            candidate = min(session.flash_dirty)
            session.flash_dirty.discard(candidate)
            if not session.closed and candidate in session.flash:
                flash_id = candidate
        if session.flash_dirty:
            self._ready.append(session)
        return flash_id
