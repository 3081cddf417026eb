"""Bounded-staleness flash reads: a cached answer on a superseded version is
served only while its successor was ingested at most ``max_staleness_ms``
ago. Time is controlled by the bounds (0 and ten minutes), not by sleeping:
flash evaluations are held back so that the cache is deterministically one
version behind."""

from __future__ import annotations

import asyncio
import time

import pytest

from helpers import greedy, reference
from rpc_gate import gate
from vllm_stateful import InvalidInputError
from vllm_stateful.protocol import Op

pytestmark = pytest.mark.asyncio(loop_scope="session")

TEN_MINUTES_MS = 600_000


async def cached_at(engine, session_id: str, versions: dict[str, int]) -> None:
    """Wait until each flash query's cached answer is on the given version."""
    for _ in range(1200):
        got = {fq.id: r.version for fq, r in engine.list_flash(session_id) if r is not None}
        if all(got.get(fid) == v for fid, v in versions.items()):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"flash answers not cached: {got} != {versions}")


async def test_superseded_answer_served_only_within_bound(engine, stock, monkeypatch):
    # Every answer from an evaluation request of its own, which the gate
    # below can hold (none rides an ingestion request).
    monkeypatch.setattr(engine.config, "flash_with_ingest", False)
    q, r = [21, 22, 23], [31, 32]
    session = await engine.create_session([5] * 50, flash=[
        {"prompt": q, "sampling_params": greedy(), "flash_id": "plain"},
        {"prompt": r, "sampling_params": greedy(), "flash_id": "lenient",
         "max_staleness_ms": TEN_MINUTES_MS},
    ])  # fmt: skip
    await cached_at(engine, session.id, {"plain": 0, "lenient": 0})
    fresh = await engine.query(session.id, q, greedy())
    assert fresh.flash and fresh.version == 0 and fresh.staleness_ms == 0.0

    with gate(engine.flash, Op.FLASH) as g:
        g.hold(session.key)  # evaluations of the new version wait
        t0 = time.monotonic()
        v1 = await engine.append(session.id, [7] * 33)
        await engine.wait_ingested(session.id, v1)
        assert [v for v, _ in session.ingested_history] == [0, 1]
        v0_answer = await reference(stock, session.tokens_at(0) + q)

        # Outside the bound: a bound of 0 (and no bound) serve only the newest.
        for bound in (0, None):
            miss = await engine.query(session.id, q, greedy(), max_staleness_ms=bound)
            assert not miss.flash and miss.version == 1 and miss.staleness_ms == 0.0
            assert miss.computed_tokens == len(q)
            assert miss.token_ids == await reference(stock, session.tokens_at(1) + q)

        # Inside the bound: the v0 answer, saying how stale it is.
        hit = await engine.query(session.id, q, greedy(), max_staleness_ms=TEN_MINUTES_MS)
        elapsed_ms = (time.monotonic() - t0) * 1e3
        (plain, cached), = [(fq, c) for fq, c in engine.list_flash(session.id) if fq.id == "plain"]
        assert hit.flash and hit.version == 0 and hit.computed_tokens == 0
        assert hit.prompt_tokens == 50 + len(q) and hit.computed_at == cached.computed_at
        assert 0.0 < hit.staleness_ms <= elapsed_ms
        assert hit.token_ids == v0_answer
        chunks = [c async for c in engine.query_stream(
            session.id, q, greedy(), max_staleness_ms=TEN_MINUTES_MS)]  # fmt: skip
        assert len(chunks) == 1 and chunks[0].flash and chunks[0].version == 0

        # "latest" reads never go below the version current when asked.
        latest = await engine.query(
            session.id, q, greedy(), consistency="latest", max_staleness_ms=TEN_MINUTES_MS
        )
        assert not latest.flash and latest.version == 1

        # The flash query's own default bound, and a query's bound over it.
        lenient = await engine.query(session.id, r, greedy())
        assert lenient.flash and lenient.version == 0 and lenient.staleness_ms > 0
        strict = await engine.query(session.id, r, greedy(), max_staleness_ms=0)
        assert not strict.flash and strict.version == 1

        with pytest.raises(InvalidInputError, match="max_staleness_ms"):
            await engine.query(session.id, q, greedy(), max_staleness_ms=-1)
        with pytest.raises(InvalidInputError, match="max_staleness_ms"):
            await engine.register_flash(session.id, [40], greedy(), max_staleness_ms="soon")

    # Caught up: the newest answer again, staleness 0.
    await cached_at(engine, session.id, {"plain": 1, "lenient": 1})
    again = await engine.query(session.id, q, greedy())
    assert again.flash and again.version == 1 and again.staleness_ms == 0.0
    assert again.token_ids == await reference(stock, session.tokens_at(1) + q)
