"""The engine's writes to the durable session log (``store/``).

A session is recorded once it is active (its creator has the token), each
append before it is acknowledged, flash registrations as they change, and
the last use now and then (expiry keeps counting across a restart). Its end
deletes it, except when the engine died or its restore failed: then it is
restored on the next start. With the store off every call is a no-op.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Iterable

from vllm_stateful.sampling_fields import SAMPLING_FIELDS
from vllm_stateful.store import SessionStore, StoredFlash, StoredSession

if TYPE_CHECKING:
    from vllm_stateful.engine.flash_query import FlashQuery
    from vllm_stateful.engine.session import Session

# Ends after which the session stays in the store, to be restored.
KEPT_ON_END = ("engine_dead", "restore_failed")


def wall_clock(monotonic: float) -> float:
    return time.time() - (time.monotonic() - monotonic)


def stored_flash(fq: FlashQuery) -> StoredFlash:
    return StoredFlash(
        id=fq.id,
        prompt=fq.prompt,
        sampling={name: getattr(fq.params, name) for name in SAMPLING_FIELDS},
        only_changed=fq.only_changed,
        max_staleness_ms=fq.max_staleness_ms,
    )


def _done() -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    future.set_result(None)
    return future


class Journal:
    def __init__(self, store: SessionStore | None):
        self.store = store

    def created(self, session: Session) -> asyncio.Future:
        if self.store is None:
            return _done()
        session.journaled_last_used = session.last_used
        return self.store.create(StoredSession(
            id=session.id, key=session.key, token_hash=session.token_hash, tenant=session.tenant,
            ttl_s=session.ttl_s, created_at=session.created_at,
            last_used=wall_clock(session.last_used), tokens=session.tokens,
            lengths=session.lengths, flash=[stored_flash(fq) for fq in session.flash.values()],
            overflow=session.overflow, max_tokens=session.max_tokens,
        ))  # fmt: skip

    def appended(self, session: Session, version: int, tokens: list[int]) -> asyncio.Future:
        if self.store is None:
            return _done()
        session.journaled_last_used = session.last_used
        return self.store.append(session.id, version, tokens, wall_clock(session.last_used))

    def slid(self, session: Session) -> asyncio.Future:
        """Rewrite the session's log for its window (engine/slide.py): a
        restart restores the window, not the dropped appends."""
        if self.store is None:
            return _done()
        return self.store.slid(
            session.id, session.key, session.first_version, session.dropped_tokens, session.slides
        )

    def flash_registered(self, session: Session, fq: FlashQuery) -> asyncio.Future:
        if self.store is None:
            return _done()
        return self.store.put_flash(session.id, stored_flash(fq))

    def flash_dropped(self, session: Session, flash_id: str) -> None:
        if self.store is not None:
            self.store.drop_flash(session.id, flash_id)

    def ended(self, session: Session, reason: str) -> asyncio.Future:
        if self.store is None or reason in KEPT_ON_END:
            return _done()
        return self.store.delete(session.id)

    def last_used(self, sessions: Iterable[Session]) -> None:
        """Record the last use of sessions used since it was last recorded
        (questions do not write on their own)."""
        if self.store is None:
            return
        changed = {}
        for s in sessions:
            if s.journaled_last_used is not None and s.last_used != s.journaled_last_used:
                s.journaled_last_used = s.last_used
                changed[s.id] = wall_clock(s.last_used)
        if changed:
            self.store.touch(changed)
