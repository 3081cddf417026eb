"""Session questions: one path for whole and streamed answers.

A question is the session's tokens at the version it reads plus the
question's tokens; the prefix cache and the connector's tail copy supply the
session's KV, so the engine computes only the question. A question never
changes the session (``commit`` is the facade's business).
"""

from __future__ import annotations

from typing import AsyncIterator, Awaitable, Callable

from vllm import SamplingParams
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from vllm_stateful import metrics
from vllm_stateful.engine.flash import FlashBook, check_staleness
from vllm_stateful.engine.registry import SessionRegistry
from vllm_stateful.engine.result import QueryResult
from vllm_stateful.engine.rpc import EngineRPC, own_params
from vllm_stateful.errors import InvalidInputError
from vllm_stateful.protocol import Op

CONSISTENCY = ("ingested", "latest")


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
    ):
        self.registry = registry
        self.rpc = rpc
        self.flash = flash
        self.encode = encode
        self.wait_ingested = wait_ingested

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
        target = session.version if consistency == "latest" else 0
        if session.ingested_version < target:
            await self.wait_ingested(session_id, target)
        version = session.ingested_version
        prompt_ids = session.tokens_at(version) + question
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
        metrics.QUERIES.labels("engine").inc()
        self.flash.scheduler.preempt()
        async for out in self.rpc.generate(session.key, prompt_ids, params, Op.QUERY):
            result = _result(out, version, prompt_ids)
            if result.finish_reason is not None:
                metrics.QUERY_COMPUTED_TOKENS.inc(result.computed_tokens)
            yield result
