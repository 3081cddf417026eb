"""O(|q|): a query computes exactly its question's tokens, however long the
session (vLLM's own counter: prompt length minus ``num_cached_tokens``)."""

from __future__ import annotations

import random

import pytest

from helpers import greedy

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest.mark.parametrize("context", [500, 2000, 6000])
async def test_query_computes_only_question(engine, context):
    rnd = random.Random(context)
    session = await engine.create_session([rnd.randrange(2, 500) for _ in range(context)])
    # Grow it by appends too, so the pin is the product of incremental ingestion.
    for _ in range(3):
        await engine.append(session.id, [rnd.randrange(2, 500) for _ in range(37)])
    await engine.wait_ingested(session.id)
    total = context + 3 * 37
    stats = engine.get_session(session.id)
    assert stats.tokens == total and stats.pinned_tokens == total
    for q_len in (1, 7, 45):
        result = await engine.query(session.id, [rnd.randrange(2, 500) for _ in range(q_len)], greedy(2))
        assert result.prompt_tokens == total + q_len
        assert result.computed_tokens == q_len


async def test_append_computes_only_delta(engine):
    """Ingestion is incremental too: each append's request reuses the pin
    (full blocks from the prefix cache, the partial tail by copy)."""
    session = await engine.create_session([3] * 1000)
    assert engine.get_session(session.id).ingest_computed_tokens == 1000
    kv = await engine.kv_stats()
    assert kv.pinned_blocks == -(-1000 // engine.block_size)
    for delta in (45, 1, 31, 100):
        before = engine.get_session(session.id).ingest_computed_tokens
        await engine.append(session.id, [4] * delta)
        await engine.wait_ingested(session.id)
        assert engine.get_session(session.id).ingest_computed_tokens == before + delta
    kv = await engine.kv_stats()
    assert kv.pinned_blocks == -(-1177 // engine.block_size)
