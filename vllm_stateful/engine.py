"""StatefulEngine: streaming sessions on top of vLLM's ``AsyncLLM``.

Every append, query and control operation is an ordinary vLLM request whose
prompt is the session's tokens (plus the question), salted per session and
tagged in ``SamplingParams.extra_args`` (see ``protocol.py``). The engine-side
connector pins each ingested version, so a query computes only its own tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from vllm_stateful import metrics
from vllm_stateful.budget import Budget
from vllm_stateful.config import StatefulConfig, connector_config
from vllm_stateful.errors import (
    BudgetExceededError,
    ContextLengthError,
    InvalidInputError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
)
from vllm_stateful.flash import (
    FlashQuery,
    FlashResult,
    FlashScheduler,
    check_cacheable,
    confidence,
    params_key,
)
from vllm_stateful.protocol import EngineReport, Op, RequestTag
from vllm_stateful.session import Session, SessionEvent, SessionStats

Data = str | Sequence[int]
CONSISTENCY = ("ingested", "latest")


@dataclass(frozen=True)
class QueryResult:
    """An answer; from :meth:`StatefulEngine.query_stream`, one delta of it
    (``text`` and ``token_ids`` are the new part; the last has
    ``finish_reason``)."""

    text: str
    token_ids: list[int]
    version: int  # the session version the answer saw
    prompt_tokens: int
    computed_tokens: int  # prompt tokens the engine computed (vLLM's counter)
    finish_reason: str | None
    committed_version: int | None = None
    flash: bool = False  # answered from a flash query's cache
    computed_at: float | None = None  # when a flash answer was computed


@dataclass(frozen=True)
class EngineKVStats:
    free_blocks: int
    total_blocks: int
    block_size: int
    pinned_blocks: int


def _own_params(params: SamplingParams | None) -> SamplingParams:
    """A private copy of a caller's sampling parameters (default: greedy,
    16 tokens); the engine sets output kind and tags on it."""
    if params is None:
        return SamplingParams(temperature=0.0, max_tokens=16)
    if not isinstance(params, SamplingParams):
        raise InvalidInputError("sampling_params must be a vllm.SamplingParams")
    return params.clone()


def _one_token() -> SamplingParams:
    """Parameters of ingest and control requests: their prompt is the work,
    the one sampled token is discarded."""
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
    params.output_kind = RequestOutputKind.FINAL_ONLY
    return params


def stateful_engine_args(**kwargs: Any) -> AsyncEngineArgs:
    """``AsyncEngineArgs`` with the session connector and prefix caching on."""
    kwargs.setdefault("enable_prefix_caching", True)
    kwargs["kv_transfer_config"] = connector_config()
    return AsyncEngineArgs(**kwargs)


class StatefulEngine:
    """Async session API over a running vLLM engine client.

    Build it with :meth:`from_engine_args`, or wrap an existing ``AsyncLLM``
    whose ``kv_transfer_config`` loads ``vllm_stateful.connector``.
    """

    def __init__(self, engine: Any, config: StatefulConfig | None = None):
        self.engine = engine
        self.config = config or StatefulConfig.from_env()
        vcfg = engine.vllm_config
        kv = vcfg.kv_transfer_config
        if kv is None or kv.kv_connector != "StatefulConnector":
            raise ValueError(
                "the engine must load the session connector: build it with "
                "vllm_stateful.stateful_engine_args(...)"
            )
        self.tokenizer = engine.get_tokenizer()
        self.block_size: int = vcfg.cache_config.block_size
        self.num_blocks: int = vcfg.cache_config.num_gpu_blocks
        self.max_model_len: int = vcfg.model_config.max_model_len
        self.vocab_size: int = vcfg.model_config.get_vocab_size()
        limit = self.config.budget_tokens
        if limit is None:
            limit = int(self.config.budget_fraction * self.num_blocks) * self.block_size
        self.budget = Budget(limit_tokens=limit, block_size=self.block_size)
        self.sessions: dict[str, Session] = {}
        # Why recently closed sessions ended, so their ids get a clear error.
        self._ended: dict[str, str] = {}
        self._reaper: asyncio.Task | None = None
        # One token for control requests (close / probe); its block is never
        # full, so it is never cached.
        bos = getattr(self.tokenizer, "bos_token_id", None)
        self._control_prompt = [bos if bos is not None else 0]
        self._flash_inflight = 0
        self.flash = FlashScheduler(
            evaluate=self._evaluate_flash,
            is_idle=self._engine_idle,
            concurrency=self.config.flash_concurrency,
        )
        metrics.bind(self)

    @classmethod
    def from_engine_args(
        cls, engine_args: AsyncEngineArgs, config: StatefulConfig | None = None
    ) -> StatefulEngine:
        from vllm.v1.engine.async_llm import AsyncLLM

        if engine_args.kv_transfer_config is None:
            engine_args.kv_transfer_config = connector_config()
        return cls(AsyncLLM.from_engine_args(engine_args), config)

    def shutdown(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        self.flash.stop()
        self.engine.shutdown()

    # ----------------------------------------------------------------- sessions

    async def create_session(
        self,
        prefix: Data = "",
        session_id: str | None = None,
        ttl_s: float | None = None,
        flash: Sequence[dict[str, Any]] = (),
    ) -> Session:
        """Open a session whose version 0 is ``prefix``; returns once the
        prefix is ingested (pinned). ``flash`` holds keyword arguments for
        :meth:`register_flash`, registered atomically with the session."""
        if session_id is not None and (not isinstance(session_id, str) or not session_id):
            raise InvalidInputError("session_id must be a non-empty string")
        session_id = session_id or uuid.uuid4().hex
        if session_id in self.sessions:
            raise SessionExistsError(f"session '{session_id}' already exists")
        if len(self.sessions) >= self.config.max_sessions:
            raise InvalidInputError(f"too many sessions (max {self.config.max_sessions})")
        if ttl_s is not None and ttl_s <= 0:
            raise InvalidInputError("ttl_s must be positive")
        if isinstance(prefix, str):
            tokens = self.tokenizer.encode(prefix, add_special_tokens=True)
        else:
            tokens = self._check_token_ids(prefix, allow_empty=True)
        self._check_fits(session_id, len(tokens))
        self.budget.check(self._pinned_by_others(None), len(tokens), session_id)
        flash_queries = [self._flash_query(**spec) for spec in flash]
        self._check_flash_room(len(flash_queries), 0)
        key = uuid.uuid4().hex
        session = Session(
            id=session_id,
            key=key,
            access_token=secrets.token_urlsafe(24),
            tokens=tokens,
            ttl_s=ttl_s if ttl_s is not None else self.config.default_ttl_s,
        )
        session.flash = {fq.id: fq for fq in flash_queries}
        self._ended.pop(session_id, None)
        self.sessions[session_id] = session
        self._start_reaper()
        self._kick(session)
        await self.wait_ingested(session_id, 0)
        return session

    async def append(self, session_id: str, data: Data) -> int:
        """Append text or token ids; returns the new version at once.

        Ingestion runs in the background, in order; appends that arrive while
        one is ingested are coalesced into the next engine request.
        """
        session = self._get(session_id)
        token_ids = self.encode(data)
        self._check_fits(session_id, len(session.tokens) + len(token_ids))
        self.budget.check(
            self._pinned_by_others(session_id), len(session.tokens) + len(token_ids), session_id
        )
        version = session.extend(token_ids)
        session.touch()
        self._kick(session)
        return version

    async def wait_ingested(
        self, session_id: str, version: int | None = None, timeout: float | None = None
    ) -> int:
        """Wait until ``version`` (default: the latest) is ingested; returns
        the ingested version."""
        session = self._get(session_id)
        target = session.version if version is None else version
        if not 0 <= target <= session.version:
            raise InvalidInputError(f"version {target} does not exist (latest {session.version})")

        async def done() -> int:
            async with session.changed:
                await session.changed.wait_for(
                    lambda: session.ingested_version >= target
                    or session.closed
                    or session.ingest_error is not None
                )
            if session.ingested_version >= target:
                return session.ingested_version
            if session.closed:
                raise SessionClosedError(f"session '{session_id}' was {session.closed_reason}")
            raise RuntimeError(f"ingestion failed: {session.ingest_error!r}")

        return await asyncio.wait_for(done(), timeout)

    async def close_session(self, session_id: str, reason: str = "closed") -> None:
        """Close the session and release its pinned KV."""
        session = self._get(session_id)
        session.closed_reason = reason
        del self.sessions[session_id]
        self._ended[session_id] = reason
        if len(self._ended) > 10 * self.config.max_sessions:
            self._ended.pop(next(iter(self._ended)))
        if session.ingest_task is not None:
            session.ingest_task.cancel()
        # The connector releases the pin and refuses to pin this key again, so
        # an append that finishes after this still leaves nothing behind.
        await self._control(session.key, Op.CLOSE)
        session.pinned_tokens = 0
        async with session.changed:
            session.changed.notify_all()
        session.publish(SessionEvent("evicted" if reason != "closed" else "closed",
                                     session.version, {"reason": reason}))

    def get_session(self, session_id: str) -> SessionStats:
        return self._get(session_id).stats()

    def list_sessions(self) -> list[SessionStats]:
        return [s.stats() for s in self.sessions.values()]

    def subscribe(self, session_id: str) -> asyncio.Queue:
        """A queue of this session's ``SessionEvent``s; ``unsubscribe`` it."""
        queue: asyncio.Queue = asyncio.Queue()
        self._get(session_id).subscribers.add(queue)
        return queue

    def unsubscribe(self, session_id: str, queue: asyncio.Queue) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.subscribers.discard(queue)

    async def kv_stats(self) -> EngineKVStats:
        """Block-pool figures from the engine (a one-token probe request)."""
        report = await self._control("probe-" + uuid.uuid4().hex, Op.PROBE)
        return EngineKVStats(
            report.free_blocks, report.total_blocks, report.block_size, report.pinned_blocks
        )

    # ------------------------------------------------------------------ queries

    async def query(
        self,
        session_id: str,
        prompt: Data,
        sampling_params: SamplingParams | None = None,
        consistency: str = "ingested",
        commit: bool = False,
    ) -> QueryResult:
        """Answer ``prompt`` after the session's context. The session is not
        changed unless ``commit`` is set, which appends question and answer."""
        session, version, prompt_ids, params = await self._prepare_query(
            session_id, prompt, sampling_params, consistency, RequestOutputKind.FINAL_ONLY
        )
        hit = None if commit else self._flash_hit(session, prompt_ids, params, version)
        if hit is not None:
            return hit
        self.flash.preempt()
        out = await self._final(session.key, prompt_ids, params, Op.QUERY)
        result = self._result(out, version, prompt_ids)
        metrics.QUERIES.labels("engine").inc()
        metrics.QUERY_COMPUTED_TOKENS.inc(result.computed_tokens)
        if commit:
            question = prompt_ids[session.lengths[version]:]
            committed = await self.append(session_id, question + result.token_ids)
            result = dataclasses.replace(result, committed_version=committed)
        return result

    async def query_stream(
        self,
        session_id: str,
        prompt: Data,
        sampling_params: SamplingParams | None = None,
        consistency: str = "ingested",
    ) -> AsyncIterator[QueryResult]:
        """Like :meth:`query`, yielding the answer as it is generated (a
        flash hit arrives whole, as one result)."""
        session, version, prompt_ids, params = await self._prepare_query(
            session_id, prompt, sampling_params, consistency, RequestOutputKind.DELTA
        )
        hit = self._flash_hit(session, prompt_ids, params, version)
        if hit is not None:
            yield hit
            return
        metrics.QUERIES.labels("engine").inc()
        self.flash.preempt()
        async for out in self._generate(session.key, prompt_ids, params, Op.QUERY):
            result = self._result(out, version, prompt_ids)
            if result.finish_reason is not None:
                metrics.QUERY_COMPUTED_TOKENS.inc(result.computed_tokens)
            yield result

    @staticmethod
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

    async def _prepare_query(
        self,
        session_id: str,
        prompt: Data,
        sampling_params: SamplingParams | None,
        consistency: str,
        output_kind: RequestOutputKind,
    ) -> tuple[Session, int, list[int], SamplingParams]:
        session = self._get(session_id)
        if consistency not in CONSISTENCY:
            raise InvalidInputError(f"consistency must be one of {CONSISTENCY}, got {consistency!r}")
        params = _own_params(sampling_params)
        question = self.encode(prompt)
        target = session.version if consistency == "latest" else 0
        if session.ingested_version < target:
            await self.wait_ingested(session_id, target)
        version = session.ingested_version
        prompt_ids = session.tokens_at(version) + question
        self._check_fits(session_id, len(prompt_ids))
        params.output_kind = output_kind
        session.touch()
        return session, version, prompt_ids, params

    # -------------------------------------------------------------------- flash

    async def register_flash(
        self,
        session_id: str,
        prompt: Data,
        sampling_params: SamplingParams | None = None,
        flash_id: str | None = None,
        only_changed: bool = False,
    ) -> FlashQuery:
        """Register a question to be answered after every ingested version.

        Its answers are cached (see :meth:`query`) and pushed as ``flash``
        events. Sampling must be deterministic (greedy, or seeded)."""
        session = self._get(session_id)
        fq = self._flash_query(prompt, sampling_params, flash_id, only_changed)
        if fq.id in session.flash:
            raise InvalidInputError(f"flash query '{fq.id}' already exists in session '{session_id}'")
        self._check_flash_room(1, len(session.flash))
        session.flash[fq.id] = fq
        if session.ingested_version >= 0:
            self.flash.notify(session, [fq.id])
        return fq

    def list_flash(self, session_id: str) -> list[tuple[FlashQuery, FlashResult | None]]:
        session = self._get(session_id)
        return [(fq, session.flash_results.get(fid)) for fid, fq in session.flash.items()]

    def drop_flash(self, session_id: str, flash_id: str) -> None:
        session = self._get(session_id)
        if session.flash.pop(flash_id, None) is None:
            raise InvalidInputError(f"no flash query '{flash_id}' in session '{session_id}'")
        session.flash_results.pop(flash_id, None)
        session.flash_dirty.discard(flash_id)

    def _flash_query(
        self,
        prompt: Data,
        sampling_params: SamplingParams | None = None,
        flash_id: str | None = None,
        only_changed: bool = False,
    ) -> FlashQuery:
        params = _own_params(sampling_params)
        check_cacheable(params)
        if flash_id is not None and (not isinstance(flash_id, str) or not flash_id):
            raise InvalidInputError("flash id must be a non-empty string")
        return FlashQuery(
            id=flash_id or uuid.uuid4().hex[:12],
            prompt=prompt if isinstance(prompt, str) else list(prompt),
            token_ids=self.encode(prompt),
            params=params,
            only_changed=bool(only_changed),
        )

    def _check_flash_room(self, adding: int, in_session: int) -> None:
        cap = self.config.max_flash_per_session
        if in_session + adding > cap:
            raise BudgetExceededError(f"too many flash queries for one session (max {cap})")
        total = sum(len(s.flash) for s in self.sessions.values())
        if total + adding > self.config.max_flash_total:
            raise BudgetExceededError(
                f"too many flash queries on this server (max {self.config.max_flash_total})"
            )

    def _flash_hit(
        self, session: Session, prompt_ids: list[int], params: SamplingParams, version: int
    ) -> QueryResult | None:
        """The cached answer of a flash query with this question and these
        sampling settings on ``version``, if there is one."""
        question = prompt_ids[session.lengths[version]:]
        key = params_key(params)
        for fid, fq in session.flash.items():
            hit = session.flash_results.get(fid)
            if (
                hit is not None
                and hit.version == version
                and fq.token_ids == question
                and params_key(fq.params) == key
            ):
                metrics.QUERIES.labels("flash_cache").inc()
                return QueryResult(
                    text=hit.text,
                    token_ids=list(hit.token_ids),
                    version=hit.version,
                    prompt_tokens=len(prompt_ids),
                    computed_tokens=0,
                    finish_reason=hit.finish_reason,
                    flash=True,
                    computed_at=hit.computed_at,
                )
        return None

    def _engine_idle(self) -> bool:
        # Counts every request of this API process, stateless OpenAI traffic
        # included: flash work waits for all of it.
        busy = self.engine.output_processor.get_num_unfinished_requests()
        return busy <= self._flash_inflight

    async def _evaluate_flash(self, session: Session, fq: FlashQuery) -> None:
        version = session.ingested_version
        prompt_ids = session.tokens_at(version) + fq.token_ids
        if len(prompt_ids) >= self.max_model_len or session.closed:
            return
        params = fq.params.clone()
        params.output_kind = RequestOutputKind.FINAL_ONLY
        params.logprobs = 0  # the sampled token's logprob, for the confidence
        self._flash_inflight += 1
        try:
            out = await self._final(session.key, prompt_ids, params, Op.QUERY)
        except Exception:
            return  # the next version retries; foreground paths report errors
        finally:
            self._flash_inflight -= 1
        metrics.FLASH_EVALUATIONS.inc()
        completion = out.outputs[0]
        previous = session.flash_results.get(fq.id)
        # Evaluations may finish out of order; versions only move forward.
        if session.closed or fq.id not in session.flash or (
            previous is not None and previous.version >= version
        ):
            return
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

    # ---------------------------------------------------------------- internals

    def _get(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            if session_id in self._ended:
                raise SessionClosedError(
                    f"session '{session_id}' is {self._ended[session_id]}"
                )
            raise SessionNotFoundError(f"session '{session_id}' not found")
        return session

    def encode(self, data: Data) -> list[int]:
        """Token ids of an append or a question: text is tokenized without
        special tokens (it continues the session's token log); token ids are
        checked against the vocabulary."""
        if isinstance(data, str):
            if not data:
                raise InvalidInputError("text must not be empty")
            return self.tokenizer.encode(data, add_special_tokens=False)
        return self._check_token_ids(data, allow_empty=False)

    def _check_token_ids(self, data: Any, allow_empty: bool) -> list[int]:
        if not isinstance(data, (list, tuple)):
            raise InvalidInputError("expected text (str) or a list of token ids")
        if not data and not allow_empty:
            raise InvalidInputError("token_ids must not be empty")
        for t in data:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise InvalidInputError(
                    f"invalid token id {t!r}: token ids are integers in [0, {self.vocab_size})"
                )
        return list(data)

    def _check_fits(self, session_id: str, num_tokens: int) -> None:
        # A request needs at least one free position to generate a token.
        if num_tokens >= self.max_model_len:
            raise ContextLengthError(
                f"session '{session_id}' would hold {num_tokens} tokens; the model's "
                f"context window (max_model_len) is {self.max_model_len}"
            )

    def _pinned_by_others(self, session_id: str | None) -> int:
        return self.budget.used(
            len(s.tokens) for s in self.sessions.values() if s.id != session_id
        )

    def _kick(self, session: Session) -> None:
        if session.ingest_task is None or session.ingest_task.done():
            session.ingest_task = asyncio.create_task(self._ingest_loop(session))

    async def _ingest_loop(self, session: Session) -> None:
        """Ingest the newest version until caught up; one request at a time
        per session keeps the order, and taking the newest version coalesces
        everything appended meanwhile."""
        while not session.closed and session.ingested_version < session.version:
            target = session.version
            prompt_ids = session.tokens_at(target)
            if not prompt_ids:  # an empty session has nothing to compute or pin
                await self._mark_ingested(session, target)
                continue
            # The new version supersedes what running evaluations look at.
            self.flash.preempt()
            try:
                out = await self._final(session.key, prompt_ids, _one_token(), Op.APPEND)
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
        self.flash.notify(session)

    async def _final(
        self, key: str, prompt_ids: list[int], params: SamplingParams, op: Op
    ) -> RequestOutput:
        final = None
        async for out in self._generate(key, prompt_ids, params, op):
            final = out
        assert final is not None and final.finished
        return final

    def _generate(
        self, key: str, prompt_ids: list[int], params: SamplingParams, op: Op
    ) -> AsyncIterator[RequestOutput]:
        params.extra_args = {**(params.extra_args or {}), **RequestTag(key, op).to_extra_args()}
        prompt = TokensPrompt(prompt_token_ids=prompt_ids, cache_salt=key)
        request_id = f"stateful-{op.value}-{uuid.uuid4().hex}"
        return self.engine.generate(prompt, params, request_id)

    async def _control(self, key: str, op: Op) -> EngineReport:
        final = await self._final(key, list(self._control_prompt), _one_token(), op)
        report = EngineReport.from_params(final.kv_transfer_params)
        assert report is not None, "the session connector did not answer"
        return report

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_expired())

    async def _reap_expired(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            for session in [s for s in self.sessions.values() if s.expired(now)]:
                await self.close_session(session.id, reason="expired")
