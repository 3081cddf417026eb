"""Pins survive a flood that evicts unpinned prefixes, and close frees them."""

from __future__ import annotations

import random

import pytest

from conftest import BLOCK_SIZE, NUM_BLOCKS
from helpers import generate, greedy

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_pin_survives_flood_and_close_frees(engine):
    rnd = random.Random(7)
    before = await engine.kv_stats()
    assert before.pinned_blocks == 0

    context = [rnd.randrange(2, 500) for _ in range(1500)]
    session = await engine.create_session(context)
    pinned = -(-1500 // BLOCK_SIZE)
    during = await engine.kv_stats()
    assert during.pinned_blocks == pinned
    assert during.free_blocks == before.free_blocks - pinned

    # An unpinned prefix, cached by stock prefix caching (no session tag).
    unpinned = [rnd.randrange(2, 500) for _ in range(1500)]
    await generate(engine.engine, unpinned, greedy(1))
    again = await generate(engine.engine, unpinned + [1], greedy(1))
    assert again.num_cached_tokens == 1500 - 1500 % BLOCK_SIZE

    # Flood: more unrelated prompt tokens than the whole KV cache holds.
    for _ in range(NUM_BLOCKS * BLOCK_SIZE // 1000 + 4):
        await generate(engine.engine, [rnd.randrange(2, 500) for _ in range(1000)], greedy(1))

    evicted = await generate(engine.engine, unpinned + [1], greedy(1))
    assert evicted.num_cached_tokens == 0
    result = await engine.query(session.id, [11, 12, 13], greedy(2))
    assert result.computed_tokens == 3

    await engine.close_session(session.id)
    after = await engine.kv_stats()
    assert after.pinned_blocks == 0
    assert after.free_blocks == before.free_blocks == before.total_blocks
