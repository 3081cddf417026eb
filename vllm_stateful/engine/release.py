"""How a session's pins are given back (the registry's release path runs
this as its own task): stop what still writes to the session, CLOSE every
key it pins, retried, and say how it ended.

A session pins its own key, and while it slides (``engine/slide.py``) the
window it builds and the keys a slide retired. Its budget is given back
only for keys the engine acknowledged; a session whose CLOSE was never
acknowledged is ``failed`` and stays budgeted until a retry succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import time

from vllm_stateful import metrics
from vllm_stateful.engine.rpc import EngineRPC
from vllm_stateful.engine.session import Session, SessionEvent, SessionState
from vllm_stateful.errors import EngineDeadError
from vllm_stateful.protocol import Op

logger = logging.getLogger(__name__)

# CLOSE attempts per release, and the pause before each retry.
CLOSE_RETRY_DELAYS_S = (0.1, 0.5, 2.0)
# How long a release waits for the session's ingestion to stop (its engine
# request aborted) before it sends CLOSE anyway.
STOP_INGEST_S = 5.0


async def release_pins(
    rpc: EngineRPC, session: Session, forgotten: asyncio.Future | None = None
) -> bool:
    """Release ``session`` (``closing``): True when every pin is gone
    (``closed``), False when one CLOSE was not acknowledged (``failed``).
    ``forgotten``: the store's delete of the session, awaited before the
    release ends."""
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
    released = await send_close(rpc, session, session.key)
    # A window being built and keys a slide retired hold pins too.
    extra = ([window.key] if window is not None else []) + list(session.retiring)
    for key in extra:
        if await send_close(rpc, session, key):
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
    return released


async def send_close(rpc: EngineRPC, session: Session, key: str) -> bool:
    """CLOSE ``key`` (the session's, or one a slide retired), retried;
    True once the engine acknowledged it (the pin is gone)."""
    for attempt, delay in enumerate((0.0, *CLOSE_RETRY_DELAYS_S)):
        if delay:
            await asyncio.sleep(delay)
        try:
            report = await rpc.control(key, Op.CLOSE)
        except EngineDeadError:
            return False  # the pins died with the engine; nothing to retry
        except Exception as exc:  # noqa: BLE001 - retried, then reported
            logger.warning("session '%s': CLOSE attempt %d failed: %r", session.id, attempt + 1, exc)
            continue
        assert report.session_pinned_tokens == 0, report
        return True
    return False
