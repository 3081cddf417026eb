"""Session lifecycle under faults: every path that ends a session gives back
its budget and pin exactly once, subscribers always hear the end, and the
engine's pins agree with the API's accounting afterwards.

Faults are injected by wrapping ``EngineRPC.generate`` (``helpers.RpcFaults``;
every request still runs on the real engine). Waits are for positive conditions
with a deadline, never a sleep followed by a negative check.
"""

from __future__ import annotations

import asyncio

import pytest

from conftest import BLOCK_SIZE, MAX_MODEL_LEN, NUM_BLOCKS
from helpers import RpcFaults, greedy, reference, until
from vllm_stateful import StatefulConfig, StatefulEngine
from vllm_stateful.engine import release as release_module
from vllm_stateful.engine.budget import budget_limit
from vllm_stateful.engine.session import SessionState
from vllm_stateful.errors import (
    BudgetExceededError,
    CommitConflictError,
    SessionClosedError,
)
from vllm_stateful.protocol import Op

pytestmark = pytest.mark.asyncio(loop_scope="session")

USABLE_BLOCKS = NUM_BLOCKS - 1  # vLLM keeps one null block


async def settled(engine, free_blocks: int) -> None:
    """No session left, the engine agrees, every block is back."""
    assert not engine.sessions and not engine.registry.ending
    check = await engine.reconcile()
    assert check.agree, check.details
    assert (check.open_sessions, check.ending_sessions, check.skipped) == (0, 0, 0)
    assert (check.engine_pins, check.pinned_blocks, check.api_pinned_tokens) == (0, 0, 0)
    assert check.free_blocks == free_blocks
    assert (await engine.kv_stats()).free_blocks == free_blocks


async def baseline(engine) -> int:
    assert not engine.sessions and not engine.registry.ending
    kv = await engine.kv_stats()
    assert kv.pinned_blocks == 0 and kv.free_blocks == kv.total_blocks == USABLE_BLOCKS
    return kv.free_blocks


def drain(queue: asyncio.Queue) -> list:
    out = []
    while not queue.empty():
        out.append(queue.get_nowait())
    return out


@pytest.fixture
def faults(engine, monkeypatch):
    f = RpcFaults(engine)
    monkeypatch.setattr(engine.rpc, "generate", f.generate)
    return f


# ----------------------------------------------------------------- closing


async def test_close_during_ingestion(engine):
    free = await baseline(engine)
    session = await engine.create_session([5] * 40)
    events = engine.subscribe(session.id)
    version = await engine.append(session.id, [6] * 3000)
    waiter = asyncio.ensure_future(engine.wait_ingested(session.id, version))
    await until(lambda: engine.rpc.unfinished() >= 1)  # the append is in the engine
    assert session.ingested_version == 0

    await engine.close_session(session.id)
    assert session.state is SessionState.CLOSED and session.pinned_tokens == 0
    with pytest.raises(SessionClosedError, match="closed"):
        await waiter
    got = drain(events)
    assert [e.type for e in got][-1] == "closed" and got[-1].data == {"reason": "closed"}
    assert all(e.type == "ingested" for e in got[:-1])
    await settled(engine, free)


async def test_cancelled_create_is_rolled_back(engine):
    from vllm_stateful import metrics

    free = await baseline(engine)
    rolled_back = metrics.CREATES_ROLLED_BACK._value.get()
    task = asyncio.ensure_future(engine.create_session([7] * 3000, session_id="gone"))
    await until(lambda: "gone" in engine.sessions and engine.rpc.unfinished() >= 1)
    session = engine.sessions["gone"]
    assert session.state is SessionState.CREATING and session.ingested_version == -1
    # While it is being created it holds its budget: 3000 tokens = 94 blocks.
    assert engine.budget.used(len(s.tokens) for s in engine.registry.budgeted()) == 94 * BLOCK_SIZE

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The create returns only after the rollback's release is over.
    assert session.state is SessionState.CLOSED and session.closed_reason == "cancelled"
    assert metrics.CREATES_ROLLED_BACK._value.get() == rolled_back + 1
    with pytest.raises(SessionClosedError, match="cancelled"):
        engine.get_session("gone")
    await settled(engine, free)
    # The id is free again.
    again = await engine.create_session([7] * 10, session_id="gone")
    assert again.state is SessionState.ACTIVE


async def test_failed_prefix_is_rolled_back(engine, faults):
    free = await baseline(engine)
    marker = [3, 1, 4, 1, 5]
    faults.fail = lambda key, prompt, op: op is Op.APPEND and prompt[:5] == marker
    with pytest.raises(Exception, match="injected failure"):
        await engine.create_session(marker + [9] * 200, session_id="broken")
    assert "broken" not in engine.sessions
    with pytest.raises(SessionClosedError, match="create_failed"):
        engine.get_session("broken")
    await settled(engine, free)


async def test_failed_close_keeps_budget_and_is_retried(engine, faults, monkeypatch):
    monkeypatch.setattr(release_module, "CLOSE_RETRY_DELAYS_S", (0.0, 0.0, 0.0))
    free = await baseline(engine)
    budget = engine.budget.limit_tokens
    assert budget == USABLE_BLOCKS // 2 * BLOCK_SIZE == 8160
    session = await engine.create_session([8] * 5000)  # 157 blocks
    events = engine.subscribe(session.id)
    key = session.key
    faults.fail = lambda k, prompt, op: op is Op.CLOSE and k == key

    await engine.close_session(session.id)
    # One try and three retries, all refused: the release failed.
    assert faults.calls.count((key, Op.CLOSE)) == 4
    assert session.state is SessionState.FAILED
    # Subscribers still hear that the session ended.
    assert [e.type for e in drain(events)] == ["closed"]
    with pytest.raises(SessionClosedError):
        engine.get_session(session.id)
    # The pin is still held, so its budget is still taken: 157 blocks of the
    # 255 leave 98, too few for 4000 tokens (125 blocks).
    with pytest.raises(BudgetExceededError):
        await engine.create_session([9] * 4000)
    check = await engine.reconcile()
    assert check.agree, check.details
    assert (check.failed_sessions, check.ending_sessions, check.engine_pins) == (1, 1, 1)
    assert check.api_pinned_tokens == check.engine_pinned_tokens == 5000
    assert check.pinned_blocks == 157

    faults.fail = lambda k, prompt, op: False
    await asyncio.gather(*engine.registry.retry_failed())
    assert session.state is SessionState.CLOSED and session.pinned_tokens == 0
    assert drain(events) == []  # the end was announced once
    await settled(engine, free)
    room = await engine.create_session([9] * 4000)
    assert engine.get_session(room.id).pinned_tokens == 4000


# ------------------------------------------------------------------ expiry


async def test_delete_racing_expiry_does_not_stop_expiry(engine, monkeypatch):
    free = await baseline(engine)
    a = await engine.create_session([4] * 100, ttl_s=0.2)
    b = await engine.create_session([4] * 100, ttl_s=0.2)
    events_a, events_b = engine.subscribe(a.id), engine.subscribe(b.id)
    await until(lambda: not events_a.empty())  # A expired
    # B expired in the same pass or is about to: a DELETE now races it.
    try:
        await engine.close_session(b.id)
        expected_b = ("closed", "closed")
    except SessionClosedError as exc:
        assert "expired" in str(exc)
        expected_b = ("evicted", "expired")
    await until(lambda: not events_b.empty())
    (ev_a,) = drain(events_a)
    (ev_b,) = drain(events_b)
    assert (ev_a.type, ev_a.data["reason"]) == ("evicted", "expired")
    assert (ev_b.type, ev_b.data["reason"]) == expected_b

    # A pass that raises is logged and the loop goes on.
    c = await engine.create_session([4] * 100, ttl_s=0.2)
    calls = []

    def broken(now: float) -> bool:
        calls.append(now)
        raise RuntimeError("injected failure in expiry")

    monkeypatch.setattr(c, "expired", broken)
    await until(lambda: len(calls) >= 2)  # two passes failed, the loop still runs
    monkeypatch.undo()
    events_c = engine.subscribe(c.id)
    await until(lambda: not events_c.empty())
    (ev_c,) = drain(events_c)
    assert (ev_c.type, ev_c.data["reason"]) == ("evicted", "expired")
    await until(lambda: c.state is SessionState.CLOSED)
    await settled(engine, free)


# ------------------------------------------------------------ subscribers


async def test_slow_subscriber_is_dropped_with_a_final_event(engine):
    free = await baseline(engine)
    session = await engine.create_session([2] * 10)
    assert session.max_event_queue == engine.config.max_event_queue == 1024
    session.max_event_queue = 4  # this session only: a small bound to reach
    slow, fast = engine.subscribe(session.id), engine.subscribe(session.id)
    seen_fast = []
    for i in range(6):
        version = await engine.append(session.id, [3 + i] * 5)
        await engine.wait_ingested(session.id, version)
        seen_fast += [(e.type, e.version) for e in drain(fast)]
    got = drain(slow)
    # Four events queued, then the one that would pass the bound became
    # "dropped" (saying why) and the reader was removed.
    assert [(e.type, e.version) for e in got] == [
        ("ingested", 1), ("ingested", 2), ("ingested", 3), ("ingested", 4), ("dropped", 5),
    ]
    assert "max_event_queue 4" in got[-1].data["reason"]
    assert slow not in session.subscribers and fast in session.subscribers
    assert seen_fast == [("ingested", v) for v in range(1, 7)]
    await engine.close_session(session.id)
    assert [e.type for e in drain(fast)] == ["closed"]
    await settled(engine, free)


# ------------------------------------------------------------------- flash


async def test_reused_flash_id_never_caches_the_old_question(engine, stock):
    free = await baseline(engine)
    session = await engine.create_session([6] * 50)
    old_q, new_q = [21, 22, 23], [31, 32, 33, 34]
    await engine.register_flash(session.id, old_q, greedy(8), flash_id="f")
    # The old evaluation is in the engine (nothing else runs)...
    await until(lambda: engine.rpc.unfinished() == 1)
    events = engine.subscribe(session.id)
    # ...when the id is dropped and registered again for another question,
    # with a longer answer: the old evaluation finishes first.
    engine.drop_flash(session.id, "f")
    await engine.register_flash(session.id, new_q, greedy(24), flash_id="f")
    expected = await reference(stock, session.tokens_at(0) + new_q, 24)
    event = await asyncio.wait_for(events.get(), 60)
    assert event.type == "flash" and event.data["flash_id"] == "f"
    assert event.data["token_ids"] == expected
    (fq, cached), = engine.list_flash(session.id)
    assert fq.token_ids == new_q and cached.token_ids == expected and cached.version == 0
    hit = await engine.query(session.id, new_q, greedy(24))
    assert hit.flash and hit.token_ids == expected
    await engine.close_session(session.id)
    await settled(engine, free)


# ------------------------------------------------------------------ commit


async def test_commit_appends_at_the_version_the_answer_saw(engine, faults):
    free = await baseline(engine)
    session = await engine.create_session([5] * 30)
    question = [40, 41]
    result = await engine.query(session.id, question, greedy(4), commit=True)
    assert result.version == 0 and result.committed_version == 1
    assert session.tokens == [5] * 30 + question + result.token_ids
    await engine.wait_ingested(session.id)

    # An append not yet ingested: an "ingested" answer would not see it.
    pending = await engine.append(session.id, [6] * 500)
    before = list(session.tokens)
    with pytest.raises(CommitConflictError, match="consistency='latest'") as info:
        await engine.query(session.id, question, greedy(4), commit=True)
    assert info.value.http_status == 409 and session.tokens == before
    await engine.wait_ingested(session.id, pending)

    # An append that lands while the answer is computed.
    faults.hold_op = Op.QUERY
    asked = asyncio.ensure_future(
        engine.query(session.id, question, greedy(4), consistency="latest", commit=True)
    )
    await asyncio.wait_for(faults.arrived.wait(), 60)
    moved = await engine.append(session.id, [7] * 3)
    faults.gate.set()
    with pytest.raises(CommitConflictError, match=f"saw version {pending}.*version {moved}"):
        await asyncio.wait_for(asyncio.shield(asked), 60)
    assert session.tokens == before + [7] * 3 and session.version == moved
    await engine.close_session(session.id)
    await settled(engine, free)


# ------------------------------------------------------------------ budget


async def test_budget_must_leave_room_for_one_max_length_request():
    # 511 usable blocks; a request of 8192 tokens needs 256 blocks of 32.
    assert budget_limit(None, 0.5, USABLE_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN) == 255 * 32
    assert budget_limit(255 * 32, 0.5, USABLE_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN) == 8160
    with pytest.raises(ValueError, match="VLLM_STATEFUL_BUDGET_TOKENS=8161.*256 blocks"):
        budget_limit(8161, 0.5, USABLE_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN)
    with pytest.raises(ValueError, match=r"FRACTION=0.6 lets sessions pin 306 of the 511 .*at most 8160 tokens"):
        budget_limit(None, 0.6, USABLE_BLOCKS, BLOCK_SIZE, MAX_MODEL_LEN)


async def test_engine_with_too_large_a_budget_refuses_to_start(engine):
    with pytest.raises(ValueError, match="VLLM_STATEFUL_BUDGET_TOKENS=9000"):
        StatefulEngine(engine.engine, StatefulConfig(budget_tokens=9000))
