"""Ingestion: turns a session's appended tokens into pinned KV.

One engine request at a time per session keeps the order; each request
takes the newest version, which coalesces everything appended meanwhile, and
computes only the tokens past the previous pin (the prefix cache and the
connector's tail copy supply the rest).
"""

from __future__ import annotations

import asyncio
from typing import Callable

from vllm_stateful import metrics
from vllm_stateful.engine.rpc import EngineRPC, one_token
from vllm_stateful.engine.session import Session, SessionEvent
from vllm_stateful.protocol import EngineReport, Op


class Ingestor:
    def __init__(
        self,
        rpc: EngineRPC,
        on_new_version: Callable[[], None],
        on_ingested: Callable[[Session], None],
    ):
        self.rpc = rpc
        # Called before a new version is sent (running flash evaluations look
        # at an older one) and after it is ingested.
        self._on_new_version = on_new_version
        self._on_ingested = on_ingested

    def kick(self, session: Session) -> None:
        """Make sure the session's ingestion loop runs."""
        if session.ingest_task is None or session.ingest_task.done():
            session.ingest_task = asyncio.create_task(self._loop(session))

    async def _loop(self, session: Session) -> None:
        while not session.closed and session.ingested_version < session.version:
            target = session.version
            prompt_ids = session.tokens_at(target)
            if not prompt_ids:  # an empty session has nothing to compute or pin
                await self._mark_ingested(session, target)
                continue
            self._on_new_version()
            try:
                out = await self.rpc.final(session.key, prompt_ids, one_token(), Op.APPEND)
            except Exception as exc:  # surfaced to waiters; the log is kept
                session.ingest_error = exc
                async with session.changed:
                    session.changed.notify_all()
                return
            computed = len(prompt_ids) - (out.num_cached_tokens or 0)
            session.ingest_requests += 1
            session.ingest_computed_tokens += computed
            metrics.INGEST_REQUESTS.inc()
            metrics.INGEST_COMPUTED_TOKENS.inc(computed)
            report = EngineReport.from_params(out.kv_transfer_params)
            session.pinned_tokens = report.session_pinned_tokens if report else 0
            await self._mark_ingested(session, target)

    async def _mark_ingested(self, session: Session, version: int) -> None:
        session.ingest_error = None
        session.ingested_version = version
        async with session.changed:
            session.changed.notify_all()
        session.publish(SessionEvent("ingested", version, {"tokens": session.lengths[version]}))
        self._on_ingested(session)
