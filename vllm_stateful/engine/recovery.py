"""Restart recovery: sessions read back from the store come back under the
same ids, tokens (by hash), versions, TTLs and flash queries; their KV is
rebuilt in the background at ingestion priority, smallest session first.

Every stored session is registered at once, in state ``restoring``, so its
id is known from the start: a question waits for its stored versions
(``consistency="ingested"`` or ``"latest"``) or gets ``SessionRestoringError``
(``"available"``). Once its stored versions are ingested it is ``active``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm import SamplingParams
from vllm.logger import init_logger

from vllm_stateful.engine.session import Session, SessionState
from vllm_stateful.engine.window import model_limit, plan_window
from vllm_stateful.errors import StatefulError
from vllm_stateful.store import StoredSession

if TYPE_CHECKING:
    from vllm_stateful.engine.facade import StatefulEngine

logger = init_logger(f"vllm.{__name__}")

# Sessions whose KV is rebuilt at once: enough to fill ingestion steps, few
# enough that the smallest sessions are back first.
RESTORE_CONCURRENCY = 4


@dataclass
class RestorePlan:
    restoring: list[Session] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # id -> why (kept in the store)


def plan(engine: StatefulEngine, stored: list[StoredSession]) -> RestorePlan:
    """Register every stored session (``restoring``), smallest first; drop
    the ones that expired while the server was down."""
    out = RestorePlan()
    now_wall, now = time.time(), time.monotonic()
    for rec in sorted(stored, key=lambda r: len(r.tokens)):
        idle_s = max(0.0, now_wall - rec.last_used)
        if rec.ttl_s is not None and idle_s > rec.ttl_s:
            out.expired.append(rec.id)
            engine.journal.store.delete(rec.id)
            continue
        limit = rec.max_tokens if rec.max_tokens is not None else model_limit(engine.max_model_len)
        try:
            rec, slid = _window(rec, limit)
            engine.registry.check_new(rec.id, len(rec.tokens), rec.ttl_s, rec.tenant)
            flash = [
                engine.flash.make(f.prompt, SamplingParams(**f.sampling), f.id, f.only_changed,
                                  f.max_staleness_ms)
                for f in rec.flash
            ]  # fmt: skip
        except StatefulError as exc:  # e.g. a smaller budget than before
            out.refused[rec.id] = exc.message
            continue
        session = Session(
            id=rec.id, key=rec.key, access_token=None, token_hash=rec.token_hash,
            tokens=list(rec.tokens), lengths=list(rec.lengths), ttl_s=rec.ttl_s,
            tenant=rec.tenant, created_at=rec.created_at, last_used=now - idle_s,
            state=SessionState.RESTORING, ready_version=rec.version,
            max_event_queue=engine.config.max_event_queue, overflow=rec.overflow,
            max_tokens=rec.max_tokens, limit=limit, first_version=rec.first_version,
            prefix_len=rec.prefix_len if rec.prefix_len is not None else -1,
            dropped_tokens=rec.dropped_tokens, slides=rec.slides,
        )  # fmt: skip
        if slid:
            engine.journal.slid(session)
        session.journaled_last_used = session.last_used
        session.flash = {fq.id: fq for fq in flash}
        engine.registry.add(session)
        out.restoring.append(session)
    return out


def _window(rec: StoredSession, limit: int) -> tuple[StoredSession, bool]:
    """A ``slide`` session stored past its limit (the server stopped while
    its window was being built) comes back as that window; True if so."""
    if rec.overflow != "slide" or len(rec.tokens) <= limit:
        return rec, False
    prefix_len = rec.prefix_len if rec.prefix_len is not None else rec.lengths[0]
    plan = plan_window(prefix_len, rec.tokens, rec.lengths, rec.first_version, limit)
    return dataclasses.replace(
        rec, tokens=plan.tokens, lengths=plan.lengths, first_version=plan.first_version,
        prefix_len=prefix_len, dropped_tokens=rec.dropped_tokens + plan.dropped_tokens,
        slides=rec.slides + 1,
    ), True  # fmt: skip


async def rebuild(engine: StatefulEngine, sessions: list[Session]) -> None:
    """Ingest the sessions' stored versions, ``RESTORE_CONCURRENCY`` at a
    time in the given order; activate each when done."""
    gate = asyncio.Semaphore(RESTORE_CONCURRENCY)
    started = time.monotonic()

    async def one(session: Session) -> None:
        async with gate:
            if session.closed:
                return
            try:
                engine.ingestor.kick(session)
                await engine.wait_ingested(session.id, session.ready_version)
                engine.registry.activate(session)
            except StatefulError as exc:
                if not session.closed:
                    logger.error("session '%s' could not be restored: %s", session.id, exc.message)
                    await engine.registry.release(session, "restore_failed")

    await asyncio.gather(*(one(s) for s in sessions))
    if sessions:
        logger.info(
            "vllm-stateful: restored %d sessions (%d tokens) in %.1f s",
            len(sessions), sum(len(s.tokens) for s in sessions), time.monotonic() - started,
        )  # fmt: skip
