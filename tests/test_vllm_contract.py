"""The vLLM internals the connector relies on. These fail loudly, with the
name of what moved, when a different vLLM is installed."""

from __future__ import annotations

import inspect

import vllm

from vllm_stateful.version import VLLM_VERSION


def params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_pinned_vllm_version():
    assert vllm.__version__.startswith(VLLM_VERSION), (
        f"vllm-stateful is pinned to vLLM {VLLM_VERSION}, found {vllm.__version__}; "
        "re-check connector.py and pins.py against the new scheduler"
    )


def test_connector_hooks():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as B

    assert params(B.__init__) == ["self", "vllm_config", "role", "kv_cache_config"]
    assert params(B.get_num_new_matched_tokens) == ["self", "request", "num_computed_tokens"]
    assert params(B.update_state_after_alloc) == ["self", "request", "blocks", "num_external_tokens"]
    assert params(B.request_finished) == ["self", "request", "block_ids"]
    assert params(B.build_connector_meta) == ["self", "scheduler_output"]
    assert params(B.start_load_kv)[:2] == ["self", "forward_context"]
    assert "bind_gpu_block_pool" in vars(B) and "bind_kv_cache_manager" in vars(B)


def test_scheduler_presents_block_aligned_hit_and_sync_load():
    # The tail copy assumes the connector sees a block-aligned local hit and
    # that a synchronous load (load_kv_async=False) is accepted.
    from vllm.v1.core.sched import scheduler

    src = inspect.getsource(scheduler.Scheduler.schedule)
    assert "get_num_new_matched_tokens(\n                                request, block_aligned_local" in src
    assert "self.connector.update_state_after_alloc(" in src


def test_block_pool_api():
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    for name in ("touch", "free_blocks", "get_num_free_blocks"):
        assert callable(getattr(BlockPool, name)), name
    assert params(BlockPool.touch) == ["self", "blocks"]
    assert params(BlockPool.free_blocks) == ["self", "ordered_blocks"]
    assert callable(KVCacheManager.get_blocks)


def test_request_and_output_fields():
    from vllm.outputs import RequestOutput
    from vllm.v1.request import Request

    out_params = params(RequestOutput.__init__)
    assert "kv_transfer_params" in out_params and "num_cached_tokens" in out_params
    for name in ("num_prompt_tokens", "prompt_token_ids", "num_computed_tokens", "sampling_params"):
        assert name in inspect.getsource(Request.__init__), name


def test_async_llm_in_flight_counter():
    # Flash work runs only when this counter says no other request is in
    # flight (engine.StatefulEngine._engine_idle).
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.output_processor import OutputProcessor

    assert "self.output_processor = OutputProcessor(" in inspect.getsource(AsyncLLM.__init__)
    assert callable(OutputProcessor.get_num_unfinished_requests)


def test_scheduler_internals_the_request_classes_arrange():
    # kv/scheduler.py arranges what vLLM's schedule() sees: it reorders and
    # filters `running` and `waiting`, and sets the step's token budget and
    # active-request cap for one call. These must still be what schedule()
    # reads, at the start of each call.
    from vllm.config import SchedulerConfig
    from vllm.v1.core.sched import request_queue, scheduler

    src = inspect.getsource(scheduler.Scheduler.schedule)
    assert "token_budget = self.max_num_scheduled_tokens" in src
    assert "while req_index < len(self.running) and token_budget > 0:" in src
    assert "if num_running >= self.max_num_active_reqs:" in src
    assert "request_queue = self.waiting" in src
    assert "self.current_step += 1" in src
    assert params(scheduler.Scheduler.update_from_output) == [
        "self", "scheduler_output", "model_runner_output",
    ]
    assert params(scheduler.Scheduler.add_request) == ["self", "request"]
    init = inspect.getsource(scheduler.Scheduler.__init__)
    for name in ("self.max_num_active_reqs", "self.max_num_scheduled_tokens", "self.connector"):
        assert f"{name} =" in init, name
    for name in ("add_request", "remove_requests", "__iter__"):
        assert callable(getattr(request_queue.RequestQueue, name)), name
    assert "scheduler_cls" in SchedulerConfig.__dataclass_fields__
    from vllm.v1.request import Request

    request_src = inspect.getsource(Request)
    for name in ("num_tokens_with_spec", "num_output_placeholders"):
        assert name in request_src, name
