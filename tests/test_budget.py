"""Admission control: past the budget, a typed refusal; nobody is evicted."""

from __future__ import annotations

import asyncio

import pytest

from conftest import BLOCK_SIZE, NUM_BLOCKS
from helpers import greedy, reference
from vllm_stateful import BudgetExceededError, SessionClosedError

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_budget_refuses_new_and_growing_sessions(engine, stock):
    budget = engine.budget.limit_tokens
    # Default fraction 0.5 of the usable blocks (vLLM keeps one null block).
    assert budget == (NUM_BLOCKS - 1) // 2 * BLOCK_SIZE
    size = 2000  # 63 blocks = 2016 pinned tokens
    sessions = []
    while engine.budget.used(len(s.tokens) for s in sessions) + 2016 <= budget:
        sessions.append(await engine.create_session([5 + len(sessions)] * size))
    assert len(sessions) == budget // 2016
    with pytest.raises(BudgetExceededError, match="budget"):
        await engine.create_session([9] * size)
    # Growing past the budget is refused too, and changes nothing.
    room = budget - engine.budget.used(len(s.tokens) for s in sessions)
    version = sessions[0].version
    with pytest.raises(BudgetExceededError):
        await engine.append(sessions[0].id, [3] * (room + BLOCK_SIZE + 16))
    assert sessions[0].version == version and len(sessions[0].tokens) == size
    # Existing sessions keep answering, exactly and at O(|q|).
    for s in sessions:
        result = await engine.query(s.id, [1, 2, 3], greedy())
        assert result.computed_tokens == 3
        assert result.token_ids == await reference(stock, s.tokens + [1, 2, 3])
    kv = await engine.kv_stats()
    assert kv.pinned_blocks == len(sessions) * 63
    # Closing one makes room again.
    await engine.close_session(sessions[0].id)
    again = await engine.create_session([9] * size)
    assert engine.get_session(again.id).pinned_tokens == size


async def test_ttl_expiry_frees_session(engine):
    session = await engine.create_session([4] * 100, ttl_s=0.5)
    assert engine.get_session(session.id).expires_at is not None
    queue = engine.subscribe(session.id)
    # The evicted event comes once the engine released the pin.
    event = await asyncio.wait_for(queue.get(), 30)
    assert event.type == "evicted" and event.data["reason"] == "expired"
    with pytest.raises(SessionClosedError, match="expired"):
        engine.get_session(session.id)
    assert (await engine.kv_stats()).pinned_blocks == 0
