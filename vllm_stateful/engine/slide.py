"""A slide: a session with ``overflow="slide"`` moves to its next window.

The window (``engine/window.py``) is built in the background as a session
log of its own under a new key: the key is both the engine-side pin and the
prefix-cache salt, so the window's KV is computed exactly as a fresh session
holding those tokens would be, and the live pin is never touched. Meanwhile
questions keep reading the previous log (its ingested version, under the old
key), and appends go to the window. Once the window has ingested the append
that overflowed, the session swaps to it in one synchronous step (no await:
no question or append sees half a swap), the store is rewritten, and the old
key's pin is released through CLOSE.

Budget: while both pins exist the session holds both (``resident_sizes``),
and the old key stays budgeted until the engine acknowledged its CLOSE. A
slide that the budget cannot hold is refused like any growth.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Callable

from vllm.logger import init_logger

from vllm_stateful.engine.release import send_close
from vllm_stateful.engine.session import Session, SessionEvent, SessionState
from vllm_stateful.engine.window import WindowPlan, plan_window
from vllm_stateful.errors import SlideInProgressError

if TYPE_CHECKING:
    from vllm_stateful.engine.ingest import Ingestor
    from vllm_stateful.engine.journal import Journal
    from vllm_stateful.engine.registry import SessionRegistry

logger = init_logger(f"vllm.{__name__}")


def newest_size(session: Session, token_ids: list[int]) -> int:
    """Tokens of the newest log (a window being built, else the
    session's) once ``token_ids`` are appended."""
    return len((session.window or session).tokens) + len(token_ids)


def plan_slide(session: Session, token_ids: list[int]) -> WindowPlan | None:
    """The window an append to a ``slide`` session starts, or None when
    the append fits. Raises ``SlideInProgressError`` when a window is
    being built and the append would overflow it too, and
    ``AppendTooLargeError`` when no window could ever hold it."""
    size = newest_size(session, token_ids)
    if size <= session.limit:
        return None
    if session.window is not None:
        raise SlideInProgressError(
            f"session '{session.id}' is building its next window and this append "
            f"would pass its limit of {session.limit} tokens again; retry once the "
            f"window is in place"
        )
    return plan_window(
        session.prefix_len, session.tokens + token_ids, [*session.lengths, size],
        session.first_version, session.limit,
    )  # fmt: skip


def pinned_besides(session: Session, sliding: bool) -> tuple[int, ...]:
    """KV sizes the session pins besides the log that grows: keys a
    slide retired, and the current log while a window is (or is about
    to be) built."""
    own = [len(session.tokens)] if (sliding or session.window) and not session.offloaded else []
    return (*own, *session.retiring.values())


class Slider:
    def __init__(
        self,
        registry: SessionRegistry,
        ingestor: Ingestor,
        journal: Journal,
        on_swapped: Callable[[Session], None],
    ):
        self.registry = registry
        self.ingestor = ingestor
        self.journal = journal
        self._on_swapped = on_swapped  # flash queries re-evaluate on the window

    def start(self, session: Session, plan: WindowPlan) -> int:
        """Begin building ``plan`` (whose newest version is the append that
        overflowed) for ``session``; returns that version. Synchronous: the
        version is taken before anything else can append."""
        assert session.window is None and session.slide_task is None
        window = Session(
            id=session.id, key=uuid.uuid4().hex, access_token=None, tokens=list(plan.tokens),
            lengths=list(plan.lengths), first_version=plan.first_version,
            prefix_len=session.prefix_len, overflow=session.overflow,
            max_tokens=session.max_tokens, limit=session.limit, tenant=session.tenant,
        )  # fmt: skip
        session.window = window
        version = window.version
        assert version == session.log_version + 1, (version, session.log_version)
        session.slide_task = asyncio.create_task(self._run(session, window, plan, version))
        session.slide_task.add_done_callback(_log_failure)
        return version

    def growth(self, session: Session, token_ids: list[int]) -> tuple[int, tuple[int, ...]]:
        """For admission before an append: the tokens of the log that grows
        (the window the append starts, else the newest log) and the pool
        copies the session keeps besides it."""
        plan = plan_slide(session, token_ids)
        size = len(plan.tokens) if plan is not None else newest_size(session, token_ids)
        return size, pinned_besides(session, sliding=plan is not None)

    def extend(self, session: Session, token_ids: list[int]) -> int:
        """Append to a ``slide`` session: to its newest log, or past its
        limit by starting a window. Re-planned on the log as it is now
        (appends taken since ``growth`` count); synchronous, so the plan
        covers every append taken before this one."""
        plan = plan_slide(session, token_ids)
        if plan is None:
            return session.extend(token_ids)
        self.registry.check_grow(
            session.id, len(plan.tokens), keeping=pinned_besides(session, sliding=True)
        )
        return self.start(session, plan)

    def kick(self, session: Session) -> None:
        """Keep ingesting the newest log: the window while one is built (after
        a failure, this is the retry), else the session's own."""
        if session.window is not None:
            if session.ingest_error is not None:
                session.ingest_error = None
            self.ingestor.kick(session.window)
        else:
            self.ingestor.kick(session)

    async def _run(self, session: Session, window: Session, plan: WindowPlan, target: int) -> None:
        self.ingestor.kick(window)
        seen_error: BaseException | None = None
        while True:
            async with window.changed:
                await window.changed.wait_for(
                    lambda: window.ingested_version >= target
                    or session.closed
                    or (window.ingest_error is not None and window.ingest_error is not seen_error)
                )
            if session.closed:
                return  # the release path closes the window's key too
            if window.ingested_version >= target:
                break
            # Waiters on the session hear the failure; the next append (or
            # retry_ingest) kicks the window again.
            seen_error = window.ingest_error
            session.ingest_error = seen_error
            async with session.changed:
                session.changed.notify_all()
        # The previous log's ingestion stops: no one reads it once the swap
        # is done (only ``Slider.kick`` starts it, never while a window is built).
        previous = session.ingest_task
        if previous is not None and not previous.done():
            previous.cancel()
            await asyncio.wait({previous})
        # Appends that arrived meanwhile may still be ingesting into the
        # window: let that finish (its pin lands under the window's key).
        # Nothing awaits between the last check and the swap, so no append
        # can start the window's loop again in between; appends it did not
        # reach are ingested by the session's own loop after the swap.
        while window.ingest_task is not None and not window.ingest_task.done():
            await asyncio.wait({window.ingest_task})
        if session.closed:
            return
        old_key = self._swap(session, window, plan)
        # Waiters (questions asking for the newest version) see the window.
        async with session.changed:
            session.changed.notify_all()
        try:
            await self.journal.slid(session)
        except Exception as exc:  # noqa: BLE001 - the store logs it; a restart slides again
            logger.error("session '%s': the store could not record the slide: %r", session.id, exc)
        # The old pin goes through the same CLOSE as a closing session; it
        # stays budgeted (``retiring``) until the engine acknowledged it.
        if await send_close(self.registry.rpc, session, old_key):
            session.retiring.pop(old_key, None)

    def _swap(self, session: Session, window: Session, plan: WindowPlan) -> str:
        """Make the window the session's log. No await: atomic for every
        question and append. Returns the retired key."""
        old_key = session.key
        session.retiring[old_key] = 0 if session.offloaded else len(session.tokens)
        session.key = window.key
        session.tokens, session.lengths = window.tokens, window.lengths
        session.first_version = window.first_version
        session.ingested_tokens = window.ingested_tokens
        session.pinned_tokens = window.pinned_tokens
        session.ingest_requests += window.ingest_requests
        session.ingest_computed_tokens += window.ingest_computed_tokens
        if window.ingest_rate_tps is not None:
            session.ingest_rate_tps = window.ingest_rate_tps
        session.unacked = window.unacked
        session.ingest_task = None
        session.ingest_error = None
        session.offloaded, session.offloaded_tokens = False, 0
        session.dropped_tokens += plan.dropped_tokens
        session.slides += 1
        session.window = None
        session.slide_task = None
        # The registry files ending sessions by key: an ending session never
        # swaps (checked by the caller), so the key change is safe.
        assert session.state is not SessionState.CLOSING
        now = time.monotonic()
        session.ingested_version = window.ingested_version
        session.ingested_history.append((session.ingested_version, now))
        # Flash answers so far read the previous log, whose versions the
        # window numbers differently (or not at all): none is served after
        # the swap; they are evaluated again on the window (``on_swapped``).
        session.flash_results.clear()
        session.publish(SessionEvent("slid", session.ingested_version, {
            "window_start_version": session.first_version,
            "tokens": len(session.tokens),
            "dropped_tokens": plan.dropped_tokens,  # by this slide
            "dropped_appends": plan.dropped_appends,
            "total_dropped_tokens": session.dropped_tokens,
            "slides": session.slides,
        }))  # fmt: skip
        session.publish(SessionEvent("ingested", session.ingested_version, {
            "tokens": session.length_at(session.ingested_version),
            "lag_s": 0.0,
            "backlog_tokens": session.backlog_tokens,
            "rate_tps": session.ingest_rate_tps,
        }))  # fmt: skip
        logger.info(
            "session '%s' slid: versions %d.. kept (%d tokens), %d tokens dropped",
            session.id, session.first_version, len(session.tokens), plan.dropped_tokens,
        )  # fmt: skip
        self._on_swapped(session)
        if session.ingested_version < session.log_version:
            self.ingestor.kick(session)  # appends that arrived after the window's last request
        return old_key


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("a session slide failed: %r", task.exception())
