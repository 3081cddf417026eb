"""Offload: sessions move their KV out of vLLM's pool (host memory, then
disk) when idle or when the budget is full, and come back on use without
recomputing it. A second ``StatefulEngine`` over the shared vLLM engine gets
a small budget, so four times more sessions than it holds stay usable.
"""

from __future__ import annotations

import pytest

from conftest import BLOCK_SIZE
from helpers import greedy, reference, session_api, until
from vllm_stateful.kv.offload import offload_dir

pytestmark = pytest.mark.asyncio(loop_scope="session")

# 4 sessions of 3 blocks (plus a question's room) fit this budget.
SESSION_TOKENS = 3 * BLOCK_SIZE - 5  # not block aligned: the tail must come back too
BUDGET = 4 * 3 * BLOCK_SIZE


def prefix(i: int) -> list[int]:
    return [1] + [(7 * i + j) % 200 + 10 for j in range(SESSION_TOKENS - 1)]


def files(key: str) -> set[str]:
    return {p.name for p in offload_dir().glob(f"{key}.*")}


async def test_four_times_the_pool_stays_usable(engine, stock):
    async with session_api(engine, budget_tokens=BUDGET, offload_idle_s=None) as eng:
        sessions = [await eng.create_session(prefix(i), session_id=f"o{i}") for i in range(16)]
        # Each create past the fourth moved the least recently used one out.
        assert [s.offloaded for s in sessions] == [True] * 12 + [False] * 4
        kv = await eng.kv_stats()
        assert kv.pinned_blocks == 4 * 3
        assert files(sessions[0].key) == {f"{sessions[0].key}.kv", f"{sessions[0].key}.tokens"}

        question = [11, 12, 13]
        for i, s in enumerate(sessions):
            answer = await eng.query(s.id, question, greedy(6))
            assert answer.token_ids == await reference(stock, prefix(i) + question, 6), i
            # Only the question was computed: the KV came back from the copy.
            assert answer.computed_tokens == len(question)
            if i < 12:
                # Bringing it back computed the one token vLLM must run.
                assert s.restore_computed_tokens == 1 and not s.offloaded
        kv = await eng.kv_stats()
        assert kv.pinned_blocks <= BUDGET // BLOCK_SIZE
        check = await eng.reconcile()
        assert check.agree, check.details
        key = sessions[0].key
    assert files(key) == set()  # closing deleted the copy


async def test_idle_session_moves_out_and_its_append_loads_it_back(engine, stock):
    async with session_api(engine, offload_idle_s=0.2) as eng:
        s = await eng.create_session(prefix(99), session_id="idle")
        await until(lambda: s.offloaded)
        assert s.pinned_tokens == 0
        assert (await eng.reconcile()).agree
        computed = s.ingest_computed_tokens
        await eng.append("idle", [21, 22, 23, 24])
        await eng.wait_ingested("idle")
        # The ingestion computed the appended tokens only: the rest was loaded.
        assert s.ingest_computed_tokens - computed == 4
        assert not s.offloaded and s.pinned_tokens == SESSION_TOKENS + 4
        answer = await eng.query("idle", [5, 6], greedy(4))
        assert answer.token_ids == await reference(stock, prefix(99) + [21, 22, 23, 24, 5, 6], 4)
        assert answer.computed_tokens == 2
