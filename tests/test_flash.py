"""Flash queries: answered in the background after each version, cached,
pushed as events, and equal to a normal query on the same version."""

from __future__ import annotations

import asyncio

import pytest
from vllm import SamplingParams

from prometheus_client import REGISTRY

from helpers import RpcFaults, greedy, reference, session_api, until
from vllm_stateful import BudgetExceededError, InvalidInputError
from vllm_stateful.protocol import Op

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def next_flash(queue: asyncio.Queue, timeout: float = 30.0):
    while True:
        event = await asyncio.wait_for(queue.get(), timeout)
        if event.type == "flash":
            return event


async def test_flash_pushed_cached_and_exact(engine, stock):
    q = [21, 22, 23, 24]
    session = await engine.create_session(
        [5] * 50, flash=[{"prompt": q, "sampling_params": greedy(), "flash_id": "last"}]
    )
    events = engine.subscribe(session.id)
    first = await next_flash(events)
    assert first.version == 0 and first.data["flash_id"] == "last"
    assert first.data["token_ids"] == await reference(stock, session.tokens_at(0) + q)
    assert 0.0 < first.data["confidence"] <= 1.0

    version = await engine.append(session.id, [7] * 33)
    event = await next_flash(events)
    assert event.version == version
    expected = await reference(stock, session.tokens_at(version) + q)
    assert event.data["token_ids"] == expected
    (fq, cached), = engine.list_flash(session.id)
    assert cached.version == version

    hit = await engine.query(session.id, q, greedy())
    assert hit.flash and hit.version == version and hit.computed_tokens == 0
    assert hit.token_ids == expected and hit.computed_at == cached.computed_at
    # Other sampling settings or another question take the normal path.
    miss = await engine.query(session.id, q, greedy(4))
    assert not miss.flash and miss.computed_tokens == len(q)
    assert miss.token_ids == expected[:4]


async def test_flash_under_stream_of_appends(engine, stock):
    flash = [{"prompt": [30 + i, 31, 32], "sampling_params": greedy(4), "flash_id": f"f{i}"} for i in range(4)]
    session = await engine.create_session([9] * 40, flash=flash)
    events = engine.subscribe(session.id)
    seen: dict[str, list[int]] = {}

    async def collect():
        while True:
            event = await events.get()
            if event.type == "flash":
                seen.setdefault(event.data["flash_id"], []).append(event.version)

    collector = asyncio.create_task(collect())
    for i in range(12):
        await engine.append(session.id, [10 + i] * (i * 5 + 1))
        # Foreground queries complete while flash work runs.
        result = await engine.query(session.id, [1, 2, 3 + i], greedy(2), consistency="latest")
        assert result.version == session.version and not result.flash
        await asyncio.sleep(0.01)
    await engine.wait_ingested(session.id)
    # Let the background catch up with the last version.
    for _ in range(300):
        if all(seen.get(f"f{i}", [-1])[-1] == session.version for i in range(4)):
            break
        await asyncio.sleep(0.05)
    collector.cancel()
    for fid, versions in seen.items():
        # Never a version older than one already pushed.
        assert versions == sorted(set(versions)), (fid, versions)
        assert versions[-1] == session.version
    for fq, result in engine.list_flash(session.id):
        full = session.tokens_at(result.version) + fq.token_ids
        assert result.token_ids == await reference(stock, full, 4)


async def test_flash_registration_errors_and_drop(engine):
    session = await engine.create_session([4] * 10)
    with pytest.raises(InvalidInputError, match="seed"):
        await engine.register_flash(session.id, "x", SamplingParams(temperature=0.8))
    seeded = await engine.register_flash(session.id, "x", SamplingParams(temperature=0.8, seed=1))
    with pytest.raises(InvalidInputError, match="already exists"):
        await engine.register_flash(session.id, "y", flash_id=seeded.id)
    with pytest.raises(InvalidInputError):
        await engine.register_flash(session.id, "")
    for i in range(engine.config.max_flash_per_session - 1):
        await engine.register_flash(session.id, [i + 2])
    with pytest.raises(BudgetExceededError, match="max"):
        await engine.register_flash(session.id, [99])
    with pytest.raises(BudgetExceededError):
        await engine.create_session("", flash=[{"prompt": [1]}] * (engine.config.max_flash_per_session + 1))

    # Dropping stops its events.
    for fq, _ in engine.list_flash(session.id):
        if fq.id != seeded.id:
            engine.drop_flash(session.id, fq.id)
    with pytest.raises(InvalidInputError):
        engine.drop_flash(session.id, "nope")
    events = engine.subscribe(session.id)
    version = await engine.append(session.id, [6, 6])
    event = await next_flash(events)
    while event.version < version:  # answers for the registration's version
        event = await next_flash(events)
    assert event.data["flash_id"] == seeded.id and event.version == version
    engine.drop_flash(session.id, seeded.id)
    await engine.append(session.id, [6, 6])
    await engine.wait_ingested(session.id)
    # Nothing registered, nothing dirty, nothing in flight (an evaluation
    # still running for the dropped query publishes nothing): no flash event
    # can come later, so checking the queue now is conclusive.
    await until(lambda: engine.rpc.unfinished() == 0)
    assert session.flash == {} and not session.flash_dirty
    while not events.empty():
        assert events.get_nowait().type != "flash"


def _with_ingest() -> float:
    return REGISTRY.get_sample_value("vllm_stateful_flash_evaluations_with_ingest_total") or 0.0


async def test_flash_rides_the_ingestion_of_each_version(engine, stock, monkeypatch):
    """A session's flash query rides each version's ingestion request: no
    evaluation request of its own. The engine pins the data as soon as the
    prompt is computed, before the answer is decoded: the ``ingested``
    event comes before the answer's, a question asked then computes only
    its own tokens, and the engine pins exactly the version's tokens.
    Answers are token-for-token stock vLLM's."""
    faults = RpcFaults(engine)
    monkeypatch.setattr(engine.rpc, "generate", faults.generate)
    q, n = [61, 62, 63], 24
    before = _with_ingest()
    # No version ends on a block boundary (32): a missing pin of the
    # partial tail block would show as computed tokens.
    session = await engine.create_session(
        [5] * 41, flash=[{"prompt": q, "sampling_params": greedy(n), "flash_id": "f"}]
    )
    events = engine.subscribe(session.id)
    for i in range(3):
        v = await engine.append(session.id, [40 + i] * (17 + i))
        await engine.wait_ingested(session.id, v)
        answer = await engine.query(session.id, [7, 8], greedy(4))
        assert answer.version == v and answer.computed_tokens == 2
        assert answer.token_ids == await reference(stock, session.tokens_at(v) + [7, 8], 4)
    await until(lambda: session.flash_results.get("f") and session.flash_results["f"].version == 3)
    seen = []
    while not events.empty():
        event = events.get_nowait()
        if event.type in ("ingested", "flash"):
            seen.append((event.type, event.version))
            if event.type == "flash":
                expected = await reference(stock, session.tokens_at(event.version) + q, n)
                assert event.data["token_ids"] == expected
    for v in (1, 2, 3):
        assert seen.index(("ingested", v)) < seen.index(("flash", v)), seen
    assert _with_ingest() - before == 4  # versions 0 to 3
    mine = [(op, d) for (key, op), d in zip(faults.calls, faults.data_tokens) if key == session.key]
    # Creation and three appends, each one ingestion request carrying the
    # question; the questions asked; no flash request.
    appends = [(Op.APPEND, session.length_at(v)) for v in range(4)]
    assert [c for c in mine if c[0] is not Op.QUERY] == appends
    check = await engine.reconcile()
    assert check.mismatches == [] and check.skipped == 0
    # The data's blocks only: 95 tokens in 3 blocks (with the question, 4).
    assert (await engine.kv_stats()).pinned_blocks == -(-session.length_at(3) // 32) == 3


async def test_flash_evaluated_on_its_own_when_riding_is_off(engine, stock):
    """``flash_with_ingest=False``: ingestion requests carry no question
    and each version's answer is an evaluation request of its own."""
    before = _with_ingest()
    async with session_api(engine, offload=False, flash_with_ingest=False) as api:
        q = [71, 72]
        session = await api.create_session(
            [6] * 30, flash=[{"prompt": q, "sampling_params": greedy(4), "flash_id": "f"}]
        )
        v = await api.append(session.id, [8] * 9)
        await until(lambda: session.flash_results.get("f") and session.flash_results["f"].version == v)
        assert session.flash_results["f"].token_ids == await reference(stock, session.tokens_at(v) + q, 4)
        await api.close_session(session.id)
    assert _with_ingest() == before
