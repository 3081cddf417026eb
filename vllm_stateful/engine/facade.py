"""StatefulEngine: the public, async session API over vLLM's ``AsyncLLM``.

A thin facade: admission and lifecycle live in ``registry``, opening and
appending in ``writes``, ingestion in ``ingest``, questions in ``query``
(and the rules of a committing one in ``commit``), flash queries in
``flash``, token ids in ``tokens``, and what is sent to vLLM in ``rpc``;
``args`` builds the engine arguments.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any, AsyncIterator, Sequence

from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs

from vllm_stateful import metrics
from vllm_stateful.config import StatefulConfig, connector_config
from vllm_stateful.engine import commit as commit_check
from vllm_stateful.engine import recovery
from vllm_stateful.engine.budget import Budget, budget_limit
from vllm_stateful.engine.flash import FlashBook
from vllm_stateful.engine.flash_query import FlashQuery, FlashResult
from vllm_stateful.engine.ingest import Ingestor
from vllm_stateful.engine.journal import Journal
from vllm_stateful.engine.query import Querier
from vllm_stateful.engine.reconcile import Reconciliation, busy_keys, reconcile
from vllm_stateful.engine.recovery import RestorePlan
from vllm_stateful.engine.registry import SessionRegistry
from vllm_stateful.engine.residency import Residency
from vllm_stateful.engine.result import EngineKVStats, QueryResult
from vllm_stateful.engine.rpc import EngineRPC
from vllm_stateful.engine.session import Session, SessionStats
from vllm_stateful.engine.slide import Slider
from vllm_stateful.engine.tokens import Data, Tokens
from vllm_stateful.engine.writes import Writer
from vllm_stateful.errors import IngestionFailedError, InvalidInputError, SessionClosedError
from vllm_stateful.protocol import Op
from vllm_stateful.store import SessionStore


class StatefulEngine:
    """Async session API over a running vLLM engine client.

    Build it with :meth:`from_engine_args`, or wrap an existing ``AsyncLLM``
    whose ``kv_transfer_config`` loads ``vllm_stateful.kv.connector``.

    ``store`` (default: the file ``config.store`` names, if any) is the
    durable session log: sessions are recorded in it, and :meth:`restore`
    brings them back after a restart.
    """

    def __init__(
        self, engine: Any, config: StatefulConfig | None = None, store: SessionStore | None = None
    ):
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
        # Checked at startup: the budget must leave room for one request of
        # max_model_len (vLLM's null block is not usable).
        limit = budget_limit(
            self.config.budget_tokens, self.config.budget_fraction, self.num_blocks - 1,
            self.block_size, self.max_model_len,
        )  # fmt: skip
        self.budget = Budget(limit_tokens=limit, block_size=self.block_size)
        self.rpc = EngineRPC(engine)
        if store is None and self.config.store not in (None, "off"):
            store = SessionStore(
                self.config.store, self.config.store_sync, model=vcfg.model_config.model
            )
        self.journal = Journal(store)
        self._restoring: asyncio.Task | None = None  # restore()'s background rebuild
        self.registry = SessionRegistry(
            self.config, self.budget, self.rpc, self.max_model_len, self.journal
        )
        self.residency = Residency(self.config, self.budget, self.rpc, self.registry.budgeted)
        self.registry.on_tick.append(self.residency.sweep)
        self.flash = FlashBook(self.config, self.registry, self.rpc, self.encode)
        self.ingestor = Ingestor(
            self.rpc,
            self.config.ingest_chunk_tokens,
            on_new_version=self.flash.scheduler.preempt,
            on_ingested=self.flash.ingested,
            ride=self.flash.rides.ride,
        )
        self.slider = Slider(
            self.registry, self.ingestor, self.journal, on_swapped=self.flash.scheduler.notify
        )
        self.tokens = Tokens(self.tokenizer, self.vocab_size)
        self.writer = Writer(
            self.config, self.tokens, self.registry, self.residency, self.flash,
            self.ingestor, self.slider, self.journal, self.wait_ingested,
        )  # fmt: skip
        self.queries = Querier(
            self.registry, self.rpc, self.flash, self.encode, self.wait_ingested,
            rate_tps=lambda: self.ingestor.rate_tps, residency=self.residency,
        )  # fmt: skip
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
        self.registry.stop()
        self.flash.stop()
        self.engine.shutdown()
        if self.journal.store is not None:
            self.journal.store.close()

    async def restore(self) -> RestorePlan:
        """Bring back the sessions of the store (after a restart): each is
        registered at once (``restoring``) and its KV rebuilt in the
        background, smallest first (``engine/recovery.py``). Call once,
        before serving; a no-op without a store."""
        store = self.journal.store
        if store is None:
            return RestorePlan()
        restored = recovery.plan(self, store.load())
        self._restoring = asyncio.create_task(recovery.rebuild(self, restored.restoring))
        return restored

    @property
    def sessions(self) -> dict[str, Session]:
        """Open sessions by id (read only)."""
        return self.registry.sessions

    # ----------------------------------------------------------------- sessions

    async def create_session(
        self,
        prefix: Data = "",
        session_id: str | None = None,
        ttl_s: float | None = None,
        flash: Sequence[dict[str, Any]] = (),
        tenant: str | None = None,
        overflow: str = "reject",
        max_tokens: int | None = None,
    ) -> Session:
        """Open a session whose version 0 is ``prefix``; returns once the
        prefix is ingested (pinned). ``flash`` holds keyword arguments for
        :meth:`register_flash`, registered atomically with the session.
        ``tenant`` (default ``"default"``) is whose per-tenant caps the
        session counts against (``TenantLimitError`` past one).

        ``max_tokens`` (default: the model's ``max_model_len`` - 1) is the
        most tokens the session holds; ``overflow`` says what an append past
        it does: ``"reject"`` refuses it (``ContextLengthError``), ``"slide"``
        drops the oldest appends, keeping the prefix (``engine/window.py``).

        If the prefix cannot be ingested or the caller is cancelled first,
        the session is rolled back (released: budget and pin given back)
        before the error propagates."""
        self.rpc.check_alive()
        return await self.writer.create(
            prefix, session_id, ttl_s, flash, tenant, overflow, max_tokens
        )

    async def append(self, session_id: str, data: Data) -> int:
        """Append text or token ids; returns the new version at once.

        Ingestion runs in the background, in order, in chunks of at most
        ``ingest_chunk_tokens``; appends that arrive while one is ingested are
        coalesced into the next engine request. Past a backlog bound the
        append is refused (``BacklogFullError``) and nothing changes.

        Past the session's ``max_tokens``, an ``overflow="slide"`` session
        starts building its next window (``engine/slide.py``) and the append
        is its newest version; questions read the previous log until the
        window is ingested.
        """
        self.rpc.check_alive()
        return await self.writer.append(session_id, data)

    async def wait_ingested(
        self, session_id: str, version: int | None = None, timeout: float | None = None
    ) -> int:
        """Wait until ``version`` (default: the latest) is ingested; returns
        the ingested version."""
        self.rpc.check_alive()
        session = self.registry.get(session_id)
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
            self.rpc.check_alive()  # the housekeeping loop ends sessions when it dies
            if session.closed:
                raise SessionClosedError(f"session '{session_id}' was {session.closed_reason}")
            raise IngestionFailedError(
                f"ingesting session '{session_id}' failed: {session.ingest_error!r}; the "
                f"session and its appends are kept, and the next append (or retry_ingest) "
                f"retries"
            )

        return await asyncio.wait_for(done(), timeout)

    async def retry_ingest(self, session_id: str) -> int:
        """Restart ingestion after a failure (the next append does too);
        returns the version it works towards. A no-op while it runs."""
        session = self.registry.get(session_id)
        self.slider.kick(session)
        return session.version

    async def close_session(self, session_id: str, reason: str = "closed") -> None:
        """Close the session and release its pinned KV. Returns once the
        engine acknowledged the release (or it failed and is retried in the
        background; the session then counts against the budget until it
        succeeds). Cancelling the caller does not stop the release."""
        self.rpc.check_alive()
        await self.registry.close(session_id, reason)

    def get_session(self, session_id: str) -> SessionStats:
        return self.registry.get(session_id).stats()

    def list_sessions(self) -> list[SessionStats]:
        return [s.stats() for s in self.registry.sessions.values()]

    def subscribe(self, session_id: str) -> asyncio.Queue:
        """A queue of this session's ``SessionEvent``s; ``unsubscribe`` it.

        The last event is ``closed`` or ``evicted``, or ``dropped`` when the
        reader let ``max_event_queue`` events pile up (it is then removed)."""
        queue: asyncio.Queue = asyncio.Queue()
        self.registry.get(session_id).subscribers.add(queue)
        return queue

    def unsubscribe(self, session_id: str, queue: asyncio.Queue) -> None:
        session = self.registry.sessions.get(session_id)
        if session is not None:
            session.subscribers.discard(queue)

    async def kv_stats(self) -> EngineKVStats:
        """Block-pool figures from the engine (a one-token probe request)."""
        report = await self.rpc.control("probe-" + uuid.uuid4().hex, Op.PROBE)
        return EngineKVStats(
            report.free_blocks, report.total_blocks, report.block_size, report.pinned_blocks
        )

    async def reconcile(self) -> Reconciliation:
        """Compare the engine's pins (a probe) with the API's accounting:
        every open or ending session's ``pinned_tokens`` against its pin, and
        no pin without a session. Sessions whose ingestion or release is in
        flight are skipped (counted in ``skipped``). Sets the
        ``vllm_stateful_reconcile_mismatches`` metric."""
        busy = busy_keys(self.registry.budgeted())
        report = await self.rpc.control("probe-" + uuid.uuid4().hex, Op.PROBE)
        assert report.pins is not None, "the connector did not report its pins"
        result = reconcile(
            self.registry.budgeted(), busy, report.pins,
            (report.pinned_blocks, report.free_blocks, report.total_blocks),
        )  # fmt: skip
        metrics.RECONCILE_MISMATCHES.set(len(result.mismatches))
        return result

    # ------------------------------------------------------------------ queries

    async def query(
        self,
        session_id: str,
        prompt: Data,
        sampling_params: SamplingParams | None = None,
        consistency: str = "ingested",
        commit: bool = False,
        max_staleness_ms: float | None = None,
    ) -> QueryResult:
        """Answer ``prompt`` after the session's context. The session is not
        changed unless ``commit`` is set, which appends question and answer.

        A matching flash query's cached answer is served when it is on the
        newest ingested version, or on an older one whose successor was
        ingested at most ``max_staleness_ms`` ago (default: the flash
        query's own bound; none: newest only). ``result.staleness_ms`` says
        how stale it was.

        ``commit`` appends question and answer at the version the answer saw,
        or refuses (``CommitConflictError``, nothing appended) when the
        session has moved past it: before the question runs when an append
        is not yet ingested (with ``consistency="ingested"``), or after it
        when an append arrived while it ran."""
        self.rpc.check_alive()
        if commit and consistency == "ingested":
            commit_check.check_before(self.registry.get(session_id))
        result = None
        async for result in self.queries.run(
            session_id, prompt, sampling_params, consistency, stream=False,
            allow_flash=not commit, max_staleness_ms=max_staleness_ms,
        ):  # fmt: skip
            pass
        assert result is not None
        if commit:
            commit_check.check_after(self.registry.get(session_id), result.version)
            # No await between the check and the append (append takes the
            # version synchronously): nothing can land in between.
            committed = await self.append(session_id, self.encode(prompt) + result.token_ids)
            result = dataclasses.replace(result, committed_version=committed)
        return result

    def query_stream(
        self,
        session_id: str,
        prompt: Data,
        sampling_params: SamplingParams | None = None,
        consistency: str = "ingested",
        max_staleness_ms: float | None = None,
    ) -> AsyncIterator[QueryResult]:
        """Like :meth:`query`, yielding the answer as it is generated (a
        flash hit arrives whole, as one result)."""
        self.rpc.check_alive()
        return self.queries.run(
            session_id, prompt, sampling_params, consistency, stream=True,
            max_staleness_ms=max_staleness_ms,
        )  # fmt: skip

    # -------------------------------------------------------------------- flash

    async def register_flash(
        self,
        session_id: str,
        prompt: Data,
        sampling_params: SamplingParams | None = None,
        flash_id: str | None = None,
        only_changed: bool = False,
        max_staleness_ms: float | None = None,
    ) -> FlashQuery:
        """Register a question to be answered after every ingested version.

        Its answers are cached (see :meth:`query`) and pushed as ``flash``
        events. Sampling must be deterministic (greedy, or seeded).
        ``max_staleness_ms`` is the default bound for serving its answer
        after a newer version was ingested."""
        self.rpc.check_alive()
        session = self.registry.get(session_id)
        fq = self.flash.make(prompt, sampling_params, flash_id, only_changed, max_staleness_ms)
        self.rpc.check_params(fq.params)
        self.flash.register(session, fq)
        await self.journal.flash_registered(session, fq)
        return fq

    def list_flash(self, session_id: str) -> list[tuple[FlashQuery, FlashResult | None]]:
        session = self.registry.get(session_id)
        return [(fq, session.flash_results.get(fid)) for fid, fq in session.flash.items()]

    def drop_flash(self, session_id: str, flash_id: str) -> None:
        session = self.registry.get(session_id)
        self.flash.drop(session, flash_id)
        self.journal.flash_dropped(session, flash_id)

    # ------------------------------------------------------------------- tokens

    def encode(self, data: Data) -> list[int]:
        """Token ids of an append or a question: text is tokenized without
        special tokens (it continues the session's token log); token ids are
        checked against the vocabulary."""
        return self.tokens.encode(data)
