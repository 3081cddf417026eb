"""The vLLM engine arguments a stateful engine is built with."""

from __future__ import annotations

from typing import Any

from vllm.engine.arg_utils import AsyncEngineArgs

from vllm_stateful.config import connector_config, scheduler_cls, speculative_config


def stateful_engine_args(**kwargs: Any) -> AsyncEngineArgs:
    """``AsyncEngineArgs`` with the session connector, the session-aware
    scheduler and prefix caching on, float32 by default on CPUs without
    native bf16 (``cpu_dtype.py``), and speculative decoding as
    ``VLLM_STATEFUL_SPECULATION`` says (``config.speculative_config``); a
    ``speculative_config`` given here wins, ``None`` turns it off."""
    from vllm_stateful.cpu_dtype import default_dtype
    from vllm_stateful.numba_threads import keep_engine_threads

    kwargs.setdefault("enable_prefix_caching", True)
    kwargs.setdefault("scheduler_cls", scheduler_cls())
    if "speculative_config" not in kwargs:
        kwargs["speculative_config"] = speculative_config()
    keep_engine_threads(kwargs["speculative_config"])
    kwargs["kv_transfer_config"] = connector_config()
    # float32 on CPUs without native bf16, unless a dtype was given.
    if (dtype := default_dtype(kwargs.get("dtype"))) is not None:
        kwargs["dtype"] = dtype
    return AsyncEngineArgs(**kwargs)
