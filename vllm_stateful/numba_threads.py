"""Keep the engine's CPU threads when vLLM's n-gram proposer runs.

vLLM's n-gram proposer (``vllm/v1/spec_decode/ngram_proposer.py``) drafts
with a numba ``parallel=True`` kernel, run in the worker's main thread, and
calls numba's ``set_num_threads`` around it. Without TBB, numba's default
threading layer is OpenMP: the GNU OpenMP runtime torch and vLLM's CPU
kernels use, and numba's thread-count calls shrink the main thread's OpenMP
team. From the first proposal on, torch runs every parallel region on one
thread: ``torch.get_num_threads()`` in the worker went 2 -> 1 on a 2-core
EPYC, prefill steps took 1.7x as long and 16 sessions decoding 1.6x, with
no draft proposed at all. numba's own ``workqueue`` layer keeps its threads
to itself; the proposer runs on one thread anyway (vLLM caps it at one).
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

THREADING_ENV = "NUMBA_THREADING_LAYER"
THREADING_LAYER = "workqueue"


def uses_ngram(speculative_config: Any) -> bool:
    """Whether a ``speculative_config`` (dict, vLLM's config object or None)
    drafts with the CPU n-gram proposer."""
    if speculative_config is None:
        return False
    if isinstance(speculative_config, dict):
        method = speculative_config.get("method")
    else:
        method = getattr(speculative_config, "method", None)
    return method == "ngram"


def keep_engine_threads(speculative_config: Any) -> None:
    """Before the engine starts (its processes inherit the environment):
    numba's workqueue layer when the n-gram proposer will run, unless the
    user chose a layer."""
    if not uses_ngram(speculative_config) or THREADING_ENV in os.environ:
        return
    os.environ[THREADING_ENV] = THREADING_LAYER
    logger.info(
        "vllm-stateful: %s=%s, so that the n-gram proposer's numba kernels do not "
        "shrink the engine's OpenMP threads", THREADING_ENV, THREADING_LAYER,
    )  # fmt: skip
