"""Flash queries: registered questions re-answered after every ingested
version and pushed before anyone asks; asking one is a cache hit.

``FlashBook`` registers and drops them, runs one evaluation (when the
``FlashScheduler`` says so) and serves cache hits; what a query and its
answer are, and when an answer may be served, is ``flash_query.py``.

With the engine-side scheduler, one flash query of a session rides each
version's ingestion request instead (``flash_ride.py``); ``ingested`` then
evaluates only the others.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Callable

from vllm import SamplingParams
from vllm.outputs import CompletionOutput
from vllm.sampling_params import RequestOutputKind

from vllm_stateful import metrics
from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.flash_query import (
    FlashQuery,
    FlashResult,
    check_cacheable,
    check_staleness,
    confidence,
    params_key,
    staleness_ms,
)
from vllm_stateful.engine.flash_ride import FlashRides
from vllm_stateful.engine.flash_scheduler import FlashScheduler
from vllm_stateful.engine.registry import SessionRegistry
from vllm_stateful.engine.result import QueryResult
from vllm_stateful.engine.rpc import EngineRPC, own_params
from vllm_stateful.engine.session import Session, SessionEvent
from vllm_stateful.errors import BudgetExceededError, InvalidInputError
from vllm_stateful.protocol import Op


class FlashBook:
    def __init__(
        self,
        config: StatefulConfig,
        registry: SessionRegistry,
        rpc: EngineRPC,
        encode: Callable[[Any], list[int]],
    ):
        self.config = config
        self.registry = registry
        self.rpc = rpc
        self.encode = encode
        self._inflight = 0
        self.rides = FlashRides(self)
        self.scheduler = FlashScheduler(
            evaluate=self._evaluate, is_idle=self._engine_idle,
            concurrency=config.flash_concurrency,
            engine_orders=rpc.engine_orders,
        )

    # ------------------------------------------------------------ registration

    def make(
        self,
        prompt: Any,
        sampling_params: SamplingParams | None = None,
        flash_id: str | None = None,
        only_changed: bool = False,
        max_staleness_ms: float | None = None,
    ) -> FlashQuery:
        params = own_params(sampling_params)
        check_cacheable(params)
        if flash_id is not None and (not isinstance(flash_id, str) or not flash_id):
            raise InvalidInputError("flash id must be a non-empty string")
        return FlashQuery(
            id=flash_id or uuid.uuid4().hex[:12],
            prompt=prompt if isinstance(prompt, str) else list(prompt),
            token_ids=self.encode(prompt),
            params=params,
            only_changed=bool(only_changed),
            max_staleness_ms=check_staleness(max_staleness_ms),
        )

    def check_room(self, adding: int, in_session: int) -> None:
        cap = self.config.max_flash_per_session
        if in_session + adding > cap:
            raise BudgetExceededError(f"too many flash queries for one session (max {cap})")
        if self.registry.flash_count() + adding > self.config.max_flash_total:
            raise BudgetExceededError(
                f"too many flash queries on this server (max {self.config.max_flash_total})"
            )

    def register(self, session: Session, fq: FlashQuery) -> None:
        if fq.id in session.flash:
            raise InvalidInputError(
                f"flash query '{fq.id}' already exists in session '{session.id}'"
            )
        self.check_room(1, len(session.flash))
        session.flash[fq.id] = fq
        if session.ingested_version >= 0:
            self.scheduler.notify(session, [fq.id])

    def drop(self, session: Session, flash_id: str) -> None:
        if session.flash.pop(flash_id, None) is None:
            raise InvalidInputError(f"no flash query '{flash_id}' in session '{session.id}'")
        session.flash_results.pop(flash_id, None)
        session.flash_dirty.discard(flash_id)
        session.flash_rides.pop(flash_id, None)

    # -------------------------------------------------------------------- hits

    def hit(
        self,
        session: Session,
        question: list[int],
        params: SamplingParams,
        max_staleness_ms: float | None,
        min_version: int = 0,
    ) -> QueryResult | None:
        """The cached answer of a flash query with this question and these
        sampling settings, if it may be served: on the newest ingested
        version, or on an older one (not below ``min_version``) superseded
        at most ``max_staleness_ms`` ago (default: the flash query's own
        bound; 0 or None serve only the newest)."""
        key = params_key(params)
        now = time.monotonic()
        for fid, fq in session.flash.items():
            cached = session.flash_results.get(fid)
            if (
                cached is None
                or cached.version < min_version
                # On a version a slide dropped: its context is gone.
                or cached.version < session.first_version
                or fq.token_ids != question
                or params_key(fq.params) != key
            ):
                continue
            stale = staleness_ms(session, cached.version, now)
            bound = max_staleness_ms if max_staleness_ms is not None else fq.max_staleness_ms
            # A superseded answer has been stale for some time > 0, so a
            # bound of 0 never serves one (deterministically).
            if stale is None or (stale > 0 and not (bound and stale <= bound)):
                continue
            metrics.QUERIES.labels("flash_cache").inc()
            return QueryResult(
                text=cached.text,
                token_ids=list(cached.token_ids),
                version=cached.version,
                prompt_tokens=session.length_at(cached.version) + len(question),
                computed_tokens=0,
                finish_reason=cached.finish_reason,
                flash=True,
                computed_at=cached.computed_at,
                staleness_ms=stale,
            )
        return None

    # ------------------------------------------------------------- evaluation

    def _engine_idle(self) -> bool:
        # Counts every request of this API process, stateless OpenAI traffic
        # included: flash work waits for all of it.
        return self.rpc.unfinished() <= self._inflight

    def ingested(self, session: Session) -> None:
        """A new version is ingested: evaluate the flash queries whose
        answer did not ride its ingestion request."""
        version = session.ingested_version
        self.scheduler.notify(
            session, [fid for fid in session.flash if session.flash_rides.get(fid) != version]
        )

    def may_evaluate(self, session: Session, prompt_tokens: int) -> bool:
        """An evaluation of this many prompt tokens fits the model and the
        session is open and in the pool (out of it, its answers stay cached
        until it is used again)."""
        return (
            prompt_tokens < self.registry.max_model_len
            and not session.closed
            and not session.offloaded
            and session.residency is None
        )

    def stop(self) -> None:
        self.scheduler.stop()
        self.rides.stop()

    @staticmethod
    def params(fq: FlashQuery, kind: RequestOutputKind) -> SamplingParams:
        params = fq.params.clone()
        params.output_kind = kind
        params.logprobs = 0  # the sampled token's logprob, for the confidence
        return params

    async def _evaluate(self, session: Session, fq: FlashQuery) -> None:
        version = session.ingested_version
        # Read together: a slide swaps log and key at once (engine/slide.py).
        prompt_ids, key = session.tokens_at(version) + fq.token_ids, session.key
        # ``is``, not ``in``: a flash id dropped and registered again names
        # another question; this evaluation belongs to the old one.
        if session.flash.get(fq.id) is not fq or not self.may_evaluate(session, len(prompt_ids)):
            return
        params = self.params(fq, RequestOutputKind.FINAL_ONLY)
        self._inflight += 1
        try:
            out = await self.rpc.final(key, prompt_ids, params, Op.FLASH)
        except Exception:
            return  # the next version retries; foreground paths report errors
        finally:
            self._inflight -= 1
        self.store(session, fq, version, key, out.outputs[0])

    def store(
        self, session: Session, fq: FlashQuery, version: int, key: str,
        completion: CompletionOutput,
    ) -> None:
        """Cache an answer on ``version`` and push it."""
        metrics.FLASH_EVALUATIONS.inc()
        previous = session.flash_results.get(fq.id)
        # Evaluations may finish out of order; versions only move forward.
        # The registration must be the one this evaluation started for.
        if session.closed or session.flash.get(fq.id) is not fq or (
            previous is not None and previous.version >= version
        ):
            return
        if session.key != key:
            return  # the session slid meanwhile: this context is no longer its own
        result = FlashResult(
            flash_id=fq.id,
            version=version,
            text=completion.text,
            token_ids=list(completion.token_ids),
            finish_reason=completion.finish_reason,
            confidence=confidence(list(completion.token_ids), completion.logprobs),
            computed_at=time.time(),
            changed=previous is None or previous.text != completion.text,
        )
        session.flash_results[fq.id] = result
        if result.changed or not fq.only_changed:
            session.publish(SessionEvent("flash", version, {
                "flash_id": fq.id,
                "text": result.text,
                "token_ids": result.token_ids,
                "confidence": result.confidence,
                "computed_at": result.computed_at,
                "changed": result.changed,
            }))
