"""Session writes: opening a session and appending to it.

Both are admitted before anything changes (the session's limits, the memory
budget, for which ``residency`` may offload idle sessions, and the backlog
bound) and journaled before the caller learns of them. A session whose
prefix cannot be ingested, or whose caller is cancelled first, is rolled
back: nobody holds its token yet.
"""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from vllm_stateful import metrics
from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.backlog import check_backlog
from vllm_stateful.engine.flash import FlashBook
from vllm_stateful.engine.ingest import Ingestor
from vllm_stateful.engine.journal import Journal
from vllm_stateful.engine.registry import SessionRegistry
from vllm_stateful.engine.residency import Residency
from vllm_stateful.engine.session import Session
from vllm_stateful.engine.slide import Slider
from vllm_stateful.engine.tokens import Data, Tokens
from vllm_stateful.engine.window import check_max_tokens, check_policy, model_limit
from vllm_stateful.errors import InvalidInputError, StoreWriteError


@dataclass
class Writer:
    config: StatefulConfig
    tokens: Tokens
    registry: SessionRegistry
    residency: Residency
    flash: FlashBook
    ingestor: Ingestor
    slider: Slider
    journal: Journal
    wait_ingested: Callable[[str, int], Awaitable[int]]

    async def create(
        self,
        prefix: Data,
        session_id: str | None,
        ttl_s: float | None,
        flash: Sequence[dict[str, Any]],
        tenant: str | None,
        overflow: str,
        max_tokens: int | None,
    ) -> Session:
        """``StatefulEngine.create_session``."""
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise InvalidInputError("session_id must be a non-empty string")
        session_id = session_id or uuid.uuid4().hex
        if tenant is None:
            tenant = "default"
        if not isinstance(tenant, str) or not tenant:
            raise InvalidInputError("tenant must be a non-empty string")
        overflow = check_policy(overflow)
        tokens = self.tokens.prefix(prefix)
        size = len(tokens)
        max_model_len = self.registry.max_model_len
        max_tokens = check_max_tokens(max_tokens, size, max_model_len)
        await self.residency.admit(
            lambda: self.registry.check_new(session_id, size, ttl_s, tenant), None, size
        )
        flash_queries = [self.flash.make(**spec) for spec in flash]
        self.flash.check_room(len(flash_queries), 0)
        session = Session(
            id=session_id,
            key=uuid.uuid4().hex,
            access_token=secrets.token_urlsafe(24),
            tokens=tokens,
            ttl_s=ttl_s if ttl_s is not None else self.config.default_ttl_s,
            tenant=tenant,
            max_event_queue=self.config.max_event_queue,
            overflow=overflow,
            max_tokens=max_tokens,
            limit=max_tokens if max_tokens is not None else model_limit(max_model_len),
        )
        session.flash = {fq.id: fq for fq in flash_queries}
        self.registry.add(session)
        try:
            self.ingestor.kick(session)
            await self.wait_ingested(session_id, 0)
            self.registry.activate(session)
            # Durable before the caller learns of it.
            await self.journal.created(session)
        except BaseException as exc:
            # Nobody holds this session's token yet: undo it.
            gone = isinstance(exc, asyncio.CancelledError)
            if session.release_task is None:  # not already ending (closed meanwhile)
                metrics.CREATES_ROLLED_BACK.inc()
            await self.registry.release(session, "cancelled" if gone else "create_failed")
            raise
        return session

    async def append(self, session_id: str, data: Data) -> int:
        """``StatefulEngine.append``."""
        session = self.registry.get(session_id)
        token_ids = self.tokens.encode(data)
        if session.overflow == "slide":
            # Past its limit the append starts a slide (re-planned after the
            # awaits, on the log as it is then).
            size, keeping = self.slider.growth(session, token_ids)
        else:
            size, keeping = len(session.tokens) + len(token_ids), ()
            self.registry.check_limit(session, size)
        await self.residency.admit(
            lambda: self.registry.check_grow(session_id, size, keeping=keeping), session, size
        )
        # An offload in flight finishes first; the ingestion below then loads
        # the copy back (an offloaded session returns to the pool this way).
        await self.residency.settle(session)
        check_backlog(
            self.config, session, self.registry.sessions.values(), len(token_ids),
            self.ingestor.rate_tps,
        )  # fmt: skip
        if session.overflow == "slide":
            version = self.slider.extend(session, token_ids)
        else:
            version = session.extend(token_ids)
        session.touch()
        # Queued in version order (nothing awaits in between); the engine
        # starts ingesting while the store commits.
        durable = self.journal.appended(session, version, token_ids)
        self.slider.kick(session)
        try:
            await durable
        except Exception as exc:
            raise StoreWriteError(
                f"version {version} of session '{session_id}' is in the session but the "
                f"session store could not record it ({exc!r}): it would not survive a restart"
            ) from exc
        return version
