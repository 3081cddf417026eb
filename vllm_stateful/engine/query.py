"""Session questions: one path for whole and streamed answers.

A question is the session's tokens at the version it reads plus the
question's tokens; the prefix cache and the connector's tail copy supply the
session's KV, so the engine computes only the question. A question never
changes the session (``commit`` is the facade's business).
"""

from __future__ import annotations

import math
from typing import AsyncIterator, Awaitable, Callable

from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from vllm_stateful import metrics
from vllm_stateful.engine.flash import FlashBook
from vllm_stateful.engine.flash_query import check_staleness
from vllm_stateful.engine.registry import SessionRegistry
from vllm_stateful.engine.residency import Residency
from vllm_stateful.engine.result import QueryResult
from vllm_stateful.engine.rpc import EngineRPC, own_params
from vllm_stateful.engine.session import Session, SessionState
from vllm_stateful.errors import InvalidInputError, SessionRestoringError
from vllm_stateful.protocol import Op

# "available" never waits: a session that is not ready is an error.
CONSISTENCY = ("ingested", "latest", "available")


def not_ready(session: Session, rate_tps: float | None) -> SessionRestoringError:
    backlog = session.backlog_tokens
    wait_s = max(1.0, math.ceil(backlog / rate_tps)) if rate_tps else 1.0
    what = "being restored" if session.state is SessionState.RESTORING else "being created"
    return SessionRestoringError(
        f"session '{session.id}' is {what}: {backlog} tokens are still to be ingested; "
        f"retry, or ask with consistency 'ingested' to wait",
        retry_after_s=wait_s,
    )


def _result(out: RequestOutput, version: int, prompt_ids: list[int]) -> QueryResult:
    completion = out.outputs[0]
    return QueryResult(
        text=completion.text,
        token_ids=list(completion.token_ids),
        version=version,
        prompt_tokens=len(prompt_ids),
        computed_tokens=len(prompt_ids) - (out.num_cached_tokens or 0),
        finish_reason=completion.finish_reason,
    )


class Querier:
    def __init__(
        self,
        registry: SessionRegistry,
        rpc: EngineRPC,
        flash: FlashBook,
        encode: Callable[[object], list[int]],
        wait_ingested: Callable[[str, int], Awaitable[int]],
        rate_tps: Callable[[], float | None],
        residency: Residency,
    ):
        self.registry = registry
        self.rpc = rpc
        self.flash = flash
        self.encode = encode
        self.wait_ingested = wait_ingested
        self.rate_tps = rate_tps
        self.residency = residency

    async def run(
        self,
        session_id: str,
        prompt: object,
        sampling_params: SamplingParams | None,
        consistency: str,
        stream: bool,
        allow_flash: bool = True,
        max_staleness_ms: float | None = None,
    ) -> AsyncIterator[QueryResult]:
        """Yield the answer: deltas when ``stream``, else one final result.
        A flash hit arrives whole, as one result; it may be on an older
        version than the newest ingested within ``max_staleness_ms``."""
        session = self.registry.get(session_id)
        if consistency not in CONSISTENCY:
            raise InvalidInputError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
        max_staleness_ms = check_staleness(max_staleness_ms)
        params = own_params(sampling_params)
        question = self.encode(prompt)
        # "ingested": the newest ingested version, once the session is ready
        # (its prefix, or a restored session's stored versions, ingested).
        target = session.version if consistency == "latest" else session.ready_version
        if session.ingested_version < target:
            if consistency == "available":
                raise not_ready(session, self.rate_tps())
            await self.wait_ingested(session_id, target)
        version = session.ingested_version
        # Read together: a slide swaps log and key at once (engine/slide.py).
        prompt_ids, key = session.tokens_at(version) + question, session.key
        self.registry.check_fits(session_id, len(prompt_ids))
        params.output_kind = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
        session.touch()

        # "latest" means at least the version current when asked: a stale
        # answer may not go below it.
        hit = (
            self.flash.hit(session, question, params, max_staleness_ms, min_version=target)
            if allow_flash
            else None
        )
        if hit is not None:
            yield hit
            return
        if session.offloaded or session.residency is not None:
            await self.residency.bring_back(session)
        metrics.QUERIES.labels("engine").inc()
        self.flash.scheduler.preempt()
        async for out in self.rpc.generate(key, prompt_ids, params, Op.QUERY):
            result = _result(out, version, prompt_ids)
            if result.finish_reason is not None:
                metrics.QUERY_COMPUTED_TOKENS.inc(result.computed_tokens)
            yield result
