"""The exactness check on the real model (SmolLM2-135M-Instruct, float32)
with real market ticks: session answers equal stock vLLM token for token."""

from __future__ import annotations

import itertools

import pytest
import pytest_asyncio

from conftest import BLOCK_SIZE, engine_kwargs
from helpers import reference, greedy

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    from vllm_stateful.models import prepare_smollm2

    return prepare_smollm2()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def pair(smollm2_path):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from vllm_stateful import StatefulEngine, stateful_engine_args

    kwargs = engine_kwargs(smollm2_path) | {"num_gpu_blocks_override": 256, "max_model_len": 4096}
    engine = StatefulEngine.from_engine_args(stateful_engine_args(**kwargs))
    stock = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, enable_prefix_caching=False))
    yield engine, stock
    engine.shutdown()
    stock.shutdown()


async def test_smollm2_ticks_session_matches_stock(pair):
    from vllm_stateful.feeds import tick_lines

    engine, stock = pair
    tok = engine.tokenizer
    ticks = tick_lines()
    session = await engine.create_session("E-mini S&P 500 trades (time price size):\n")
    question = "Question: what was the last traded price?\nAnswer:"
    q_ids = tok.encode(question, add_special_tokens=False)
    for n_lines in (1, 3, 9, 2, 17):
        await engine.append(session.id, "".join(itertools.islice(ticks, n_lines)))
        result = await engine.query(session.id, question, greedy(12), consistency="latest")
        full = session.tokens_at(result.version) + q_ids
        assert result.computed_tokens == len(q_ids)
        assert result.token_ids == await reference(stock, full, 12)
    assert len(session.tokens) > 4 * BLOCK_SIZE
