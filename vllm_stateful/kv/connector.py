"""KV connector that keeps session KV alive inside vLLM.

Loaded by vLLM in the scheduler process (role SCHEDULER) and in each worker
(role WORKER); the two halves share only ``StatefulConnectorMetadata``.

Scheduler side: pins each session's blocks after its append finishes
(``PinTable``), and, when a session request's prefix-cache hit stops at the
pinned partial block, claims that block's tokens as "external" so the
scheduler skips them. Worker side: copies the pinned partial block into the
block the request was given, before the forward pass. Together a query
computes exactly its own tokens.

Offload (``Op.OFFLOAD``): the worker copies a session's pinned blocks out of
the pool (``offload.py``: host memory, then disk; ``offload_plan.py``: what
to copy in each step) in the step the control request is scheduled, and
the pin is released. The session's next request claims those tokens as
external and the worker loads them back into the blocks it was given, so
bringing a session back computes nothing but the one token vLLM needs to
run; its append pins the blocks again. A file left by an earlier run of the
engine is found by the session's key (restart).

Correctness never depends on a pin: untagged requests and mismatching
prompts get 0 external tokens and simply recompute.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger

from vllm_stateful.kv.engine_time import ReportsEngineTime
from vllm_stateful.kv.offload import OffloadStore
from vllm_stateful.kv.offload_plan import OffloadPlan, StepTransfers
from vllm_stateful.kv.pins import PinTable
from vllm_stateful.protocol import REPORT_KEY, EngineReport, Op, RequestTag

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

    from vllm_stateful.kv.steps import StepLog

# Under "vllm." so vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")


@dataclass
class StatefulConnectorMetadata(KVConnectorMetadata):
    # (src_block_id, dst_block_id) copies to run before this step's forward.
    copies: list[tuple[int, int]] = field(default_factory=list)
    # Offload's saves, loads and drops (``offload_plan.py``): run before
    # copies, in that order.
    offload: StepTransfers = field(default_factory=StepTransfers)


def _wants_report(request: Request) -> bool:
    params = request.sampling_params
    return params is not None and bool((params.extra_args or {}).get(REPORT_KEY))


def _tag(request: Request) -> RequestTag | None:
    params = request.sampling_params
    return None if params is None else RequestTag.from_extra_args(params.extra_args)


class StatefulConnector(ReportsEngineTime, KVConnectorBase_V1):
    def __init__(
        self,
        vllm_config: VllmConfig,
        role: KVConnectorRole,
        kv_cache_config: KVCacheConfig | None = None,
    ):
        super().__init__(vllm_config, role, kv_cache_config)
        self.block_size = vllm_config.cache_config.block_size
        # Scheduler side.
        self.pins: PinTable | None = None
        self._planned: dict[str, tuple[int, int, int]] = {}  # req -> (src, n, dst index)
        self._loaded: dict[str, int] = {}  # req -> tail tokens copied
        self._step_copies: list[tuple[int, int]] = []
        self.offload_plan = OffloadPlan(self.block_size)
        # Appends in flight per session key (request ids), and the keys closed
        # while one of them was in flight: such an append must not pin again
        # when it finishes. A closed key is forgotten once its last append in
        # flight has finished (the close is then fully acknowledged), so both
        # stay as small as the requests in flight.
        self._live_appends: dict[str, set[str]] = {}
        self._closed: set[str] = set()
        # Appends a flash question rides whose data is pinned (request ids).
        self._rode: set[str] = set()
        # Worker side.
        self._kv_caches: list[torch.Tensor] = []
        self._offload_store: OffloadStore | None = None
        # Set by the engine-side scheduler when it is ours (kv/scheduler.py).
        self._step_log: StepLog | None = None

    def attach_step_log(self, step_log: StepLog) -> None:
        self._step_log = step_log

    # ---------------------------------------------------------------- scheduler

    def bind_gpu_block_pool(self, gpu_block_pool: BlockPool) -> None:
        groups = self._kv_cache_config.kv_cache_groups
        # One attention group (plain decoder models); hybrid models would need
        # one pin per group.
        if len(groups) != 1:
            raise ValueError(
                f"vllm-stateful supports models with one KV cache group; this model "
                f"has {len(groups)} (hybrid attention)"
            )
        self.pins = PinTable(gpu_block_pool, self.block_size)

    def on_new_request(self, request: Request) -> None:
        tag = _tag(request)
        if tag is not None and tag.op is Op.APPEND:
            self._live_appends.setdefault(tag.session, set()).add(request.request_id)

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tag = _tag(request)
        if tag is None or self.pins is None:
            return 0, False
        if tag.op is Op.CLOSE:
            # Idempotent: this may run again if allocation is retried.
            if self._live_appends.get(tag.session):
                self._closed.add(tag.session)
            self.pins.release(tag.session)
            self.offload_plan.closed(tag.session)
            return 0, False
        pin = self.pins.pins.get(tag.session)
        if tag.op is Op.OFFLOAD:
            if pin is not None:
                self.offload_plan.save(
                    request.request_id, tag.session, pin.block_ids, pin.token_ids
                )
            return 0, False
        if tag.op is Op.PROBE:
            return 0, False
        if self.offload_plan.supplies(tag.session, None if pin is None else len(pin.token_ids)):
            return self.offload_plan.plan_load(request, tag.session, num_computed_tokens), False
        n, src = self.pins.match_tail(
            tag.session, request.prompt_token_ids, num_computed_tokens
        )
        if n == 0:
            self._planned.pop(request.request_id, None)
            return 0, False
        # The hit is block aligned: the tail lands in the block at this index.
        self._planned[request.request_id] = (src, n, num_computed_tokens // self.block_size)
        # Synchronous load: the copy runs in start_load_kv of the same step,
        # before the forward pass that reads it.
        return n, False

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        loaded = self.offload_plan.allocated(request.request_id, blocks, num_external_tokens)
        if loaded:
            self._loaded[request.request_id] = loaded
            return
        plan = self._planned.pop(request.request_id, None)
        if num_external_tokens == 0 or plan is None:
            return
        src, n, dst_index = plan
        assert n == num_external_tokens, (n, num_external_tokens)
        dst = blocks.get_block_ids()[0][dst_index]
        self._step_copies.append((src, dst))
        self._loaded[request.request_id] = n

    def build_connector_meta(
        self, scheduler_output: SchedulerOutput
    ) -> KVConnectorMetadata:
        meta = StatefulConnectorMetadata(
            copies=self._step_copies, offload=self.offload_plan.take_step()
        )
        self._step_copies = []
        return meta

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._planned.pop(request.request_id, None)
        self.offload_plan.forget(request.request_id)
        loaded = self._loaded.pop(request.request_id, 0)
        tag = _tag(request)
        wait = self._step_log.pop(request.request_id) if self._step_log else None
        if tag is None and wait is not None and _wants_report(request):
            tag = RequestTag(session="", op=Op.QUERY)
        if tag is None or self.pins is None:
            return False, None
        if (
            tag.op is Op.APPEND
            # A flash question rode it: pinned when its prompt was computed.
            and tag.data_tokens is None
            and request.num_computed_tokens >= request.num_prompt_tokens
        ):
            self._pin(tag.session, block_ids, request.prompt_token_ids)
        if tag.op is Op.APPEND:
            self._rode.discard(request.request_id)
            self._append_finished(tag.session, request.request_id)
        if tag.op is Op.OFFLOAD:
            self.offload_plan.saved(request.request_id, self.pins)
        report = self._report(request, tag, loaded)
        if wait is not None:
            report = dataclasses.replace(
                report,
                # Steps it sat out: 0 when it ran in the step after it arrived.
                waited_steps=(wait.first_step or wait.arrival_step + 1) - wait.arrival_step - 1,
                ingest_tokens_waited=wait.ingest_tokens_before,
                max_ingest_alongside=wait.max_ingest_alongside,
            )
        return False, report.to_params()

    def prompt_computed(self, request: Request) -> None:
        """Called by the engine-side scheduler after the step that computed
        the rest of ``request``'s prompt, before its outputs are processed.
        An append a flash question rides pins its data now: the session's
        next request and its ``ingested`` event need not wait for the
        answer's decode steps. The blocks past the data hold the question;
        the pin keeps only the data's (a partial last block is copied up to
        the pin's tokens, ``PinTable.match_tail``)."""
        tag = _tag(request)
        if tag is None or tag.op is not Op.APPEND or tag.data_tokens is None:
            return
        if request.request_id in self._rode:
            return  # recomputed after a preemption: pinned already
        self._rode.add(request.request_id)
        assert self._kv_cache_manager is not None
        block_ids = self._kv_cache_manager.get_block_ids(request.request_id)[0]
        self._pin(tag.session, block_ids, request.prompt_token_ids[: tag.data_tokens])

    def _pin(self, session: str, block_ids: list[int], tokens: list[int]) -> None:
        """Pin a session's newly ingested version, unless it was closed
        while the append was in flight."""
        assert self.pins is not None
        if session in self._closed:
            return
        self.pins.replace(session, block_ids, tokens)
        self.offload_plan.pinned(session, len(tokens))  # back in the pool, whole: drops the copy

    def _append_finished(self, session: str, request_id: str) -> None:
        live = self._live_appends.get(session)
        if live is not None:
            live.discard(request_id)
            if live:
                return
            del self._live_appends[session]
        self._closed.discard(session)

    def _report(self, request: Request, tag: RequestTag, loaded: int) -> EngineReport:
        assert self.pins is not None and self._kv_cache_manager is not None
        pool = self.pins.pool
        # Blocks this request alone holds become free right after this call.
        own = self._kv_cache_manager.get_blocks(request.request_id).blocks[0]
        freed = sum(1 for b in own if b.ref_cnt == 1 and not b.is_null)
        pin = self.pins.pins.get(tag.session)
        return EngineReport(
            free_blocks=pool.get_num_free_blocks() + freed,
            total_blocks=pool.num_gpu_blocks - 1,  # minus the null block
            block_size=self.block_size,
            pinned_blocks=self.pins.pinned_blocks,
            session_pinned_tokens=len(pin.token_ids) if pin else 0,
            tail_tokens_loaded=loaded,
            pins=(
                {key: len(p.token_ids) for key, p in self.pins.pins.items()}
                if tag.op is Op.PROBE
                else None
            ),
        )

    # ------------------------------------------------------------------- worker

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # Every layer's cache has the block dimension first, so one index
        # copies a whole block of K and V for that layer.
        self._kv_caches = list(kv_caches.values())
        self._offload_store = OffloadStore()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StatefulConnectorMetadata)
        store = self._offload_store
        transfers = meta.offload
        if transfers.saves or transfers.loads or transfers.drops:
            assert store is not None
        for key, block_ids, tokens in transfers.saves:
            store.save(key, self._kv_caches, block_ids, tokens)
        for key, src_blocks, dst_blocks in transfers.loads:
            store.load(key, self._kv_caches, src_blocks, dst_blocks)
        for key in transfers.drops:
            store.drop(key)
        for src, dst in meta.copies:
            for cache in self._kv_caches:
                cache[dst].copy_(cache[src])

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return

    def wait_for_save(self) -> None:
        return
