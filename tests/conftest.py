"""Shared fixtures: one stateful engine and one stock engine per test run.

Both run the deterministic tiny model in float32 (token-exact comparisons
need it; in bfloat16 a different prefill split can flip a greedy token in
stock vLLM too). Block size 32 and 512 blocks keep sizes small and make
appends cross block boundaries often.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# The engine-side scheduler's pacing, made exact for the tests: a step
# carries at most INGEST_STEP_TOKENS ingestion tokens, with or without a
# question running (no measured allowance on top).
INGEST_STEP_TOKENS = 32
os.environ["VLLM_STATEFUL_MIN_INGEST_TOKENS"] = str(INGEST_STEP_TOKENS)
os.environ["VLLM_STATEFUL_FOREGROUND_SLACK"] = "0"
os.environ["VLLM_STATEFUL_IDLE_STEP_FACTOR"] = "0"
os.environ["VLLM_STATEFUL_ACTIVE_STEP_FACTOR"] = "0"
# Chunked ingestion exercised at the tiny model's context sizes (the shared
# engines below, and test servers through the environment).
INGEST_CHUNK_TOKENS = 256
os.environ["VLLM_STATEFUL_INGEST_CHUNK_TOKENS"] = str(INGEST_CHUNK_TOKENS)
# The shared engines and test servers run without speculative decoding (the
# product default is n-gram): their tests count steps and tokens exactly.
# tests/test_speculation.py has its own speculative engine.
os.environ["VLLM_STATEFUL_SPECULATION"] = "off"
# Lets a test run a function in the engines' workers (``collective_rpc``):
# tests/test_speculation.py reads the worker's torch thread count.
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"

import pytest
import pytest_asyncio

BLOCK_SIZE = 32
NUM_BLOCKS = 512
MAX_MODEL_LEN = 8192


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from vllm_stateful.models import tiny_model

    return tiny_model()


def engine_kwargs(model: str) -> dict:
    return dict(
        model=model,
        dtype="float32",
        enforce_eager=True,
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK_SIZE,
        num_gpu_blocks_override=NUM_BLOCKS,
    )


# The shared stateful engine writes its step trace here (kv/steps.py), so
# tests can read what each engine step computed. (Named by the test run's
# process: this module is imported twice, as a conftest and by test modules.)
STEP_TRACE = os.path.join(tempfile.gettempdir(), f"vllm-stateful-test-steps-{os.getpid()}.jsonl")


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stateful(tiny_model_path):
    from vllm_stateful import StatefulConfig, StatefulEngine, stateful_engine_args
    from vllm_stateful.kv.steps import TRACE_ENV

    # Only this engine's core process inherits it (test servers do not).
    os.environ[TRACE_ENV] = STEP_TRACE
    engine = StatefulEngine.from_engine_args(
        stateful_engine_args(**engine_kwargs(tiny_model_path)),
        # Offload off: these engines' tests assert admission exactly (a
        # create past the budget is refused); tests/test_offload.py gives
        # offload its own session API over the shared engine.
        StatefulConfig(budget_fraction=0.5, offload=False, ingest_chunk_tokens=INGEST_CHUNK_TOKENS),
    )
    os.environ.pop(TRACE_ENV)
    yield engine
    engine.shutdown()
    if os.path.exists(STEP_TRACE):
        os.remove(STEP_TRACE)


@pytest_asyncio.fixture(loop_scope="session")
async def engine(stateful):
    """The shared engine; every session a test leaves open is closed after it,
    and the requests it left in flight (flash evaluations of a closed session,
    say) are given time to finish, so the next test starts on a quiet pool."""
    yield stateful
    for session_id in list(stateful.sessions):
        await stateful.close_session(session_id)
    for _ in range(3000):  # at most ~30 s; a test that leaks a request fails its own checks
        if stateful.rpc.unfinished() == 0:
            break
        await asyncio.sleep(0.01)


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stateful_spec(tiny_model_path):
    """A second stateful engine, with speculative decoding as
    ``VLLM_STATEFUL_SPECULATION=ngram`` configures it (n-gram proposer and
    its batch-size schedule)."""
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.metrics.loggers import StatLoggerBase

    from vllm_stateful import StatefulConfig, StatefulEngine, stateful_engine_args
    from vllm_stateful.config import speculative_config

    totals = {"drafts": 0, "draft_tokens": 0, "accepted_tokens": 0}

    class SpecDecodeTotals(StatLoggerBase):
        """vLLM's per-step speculative decoding counts, summed: the tests
        check that drafts were really verified and accepted."""

        def __init__(self, vllm_config, engine_index=0):
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
            spec = scheduler_stats and scheduler_stats.spec_decoding_stats
            if spec:
                totals["drafts"] += spec.num_drafts
                totals["draft_tokens"] += spec.num_draft_tokens
                totals["accepted_tokens"] += spec.num_accepted_tokens

        def log_engine_initialized(self):
            pass

    args = stateful_engine_args(
        **engine_kwargs(tiny_model_path), speculative_config=speculative_config("ngram")
    )
    engine = StatefulEngine(
        AsyncLLM.from_engine_args(args, stat_loggers=[SpecDecodeTotals]),
        # Offload off: these engines' tests assert admission exactly (a
        # create past the budget is refused); tests/test_offload.py gives
        # offload its own session API over the shared engine.
        StatefulConfig(budget_fraction=0.5, offload=False, ingest_chunk_tokens=INGEST_CHUNK_TOKENS),
    )
    engine.spec_decode_totals = totals
    yield engine
    engine.shutdown()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def stock(tiny_model_path):
    """Stock vLLM: no connector, no prefix caching. The reference."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(**engine_kwargs(tiny_model_path), enable_prefix_caching=False)
    )
    yield llm
    llm.shutdown()
