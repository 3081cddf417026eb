"""Chunked ingestion: appends larger than ``ingest_chunk_tokens`` go to the
engine as successive requests of at most that many new tokens, each pinned
when it finishes; versions advance only to real versions; appends that pile
up are still coalesced; answers equal stock vLLM token for token."""

from __future__ import annotations

import random

import pytest
from prometheus_client import REGISTRY

from helpers import greedy, reference
from rpc_gate import gate
from vllm_stateful.protocol import Op

pytestmark = pytest.mark.asyncio(loop_scope="session")

CHUNK = 256  # what tests/conftest.py sets for the shared engine


def lag_count() -> float:
    return REGISTRY.get_sample_value("vllm_stateful_ingest_lag_seconds_count") or 0.0


def drain(queue) -> list:
    events = []
    while not queue.empty():
        events.append(queue.get_nowait())
    return [e for e in events if e.type == "ingested"]


async def test_large_appends_ingest_in_chunks(engine, stock):
    assert engine.ingestor.chunk_tokens == CHUNK
    rnd = random.Random(11)
    prefix = [rnd.randrange(2, 500) for _ in range(700)]
    state: dict = {}
    probe = lambda: (state["s"].ingested_version, state["s"].ingested_tokens) if "s" in state else None  # noqa: E731
    with gate(engine.ingestor, Op.APPEND, probe) as g:
        session = await engine.create_session(prefix)
        state["s"] = session
        key = session.key
        # 700 prefix tokens: chunk ends 256, 512, 700.
        assert [c.prompt_tokens for c in g.calls_of(key)] == [256, 512, 700]
        assert [c.computed for c in g.calls_of(key)] == [256, 256, 188]
        stats = engine.get_session(session.id)
        assert (stats.ingest_requests, stats.ingest_computed_tokens) == (3, 700)
        assert (stats.ingested_tokens, stats.pinned_tokens, stats.backlog_tokens) == (700, 700, 0)
        assert stats.ingested_version == 0 and stats.ingest_lag_s == 0.0
        assert stats.ingest_rate_tps is not None and stats.ingest_rate_tps > 0

        # One append of 600: three chunks (956, 1212, 1300); the version
        # moves only when the last one is pinned.
        events = engine.subscribe(session.id)
        lags_before = lag_count()
        delta = [rnd.randrange(2, 500) for _ in range(600)]
        v1 = await engine.append(session.id, delta)
        assert await engine.wait_ingested(session.id, v1) == 1
        calls = g.calls_of(key)[3:]
        assert [c.prompt_tokens for c in calls] == [956, 1212, 1300]
        assert [c.computed for c in calls] == [256, 256, 88]
        # Sent with the version still at 0 and the pin at each chunk's start.
        assert [c.seen for c in calls] == [(0, 700), (0, 956), (0, 1212)]
        stats = engine.get_session(session.id)
        assert (stats.ingest_requests, stats.ingest_computed_tokens) == (6, 1300)
        assert (stats.ingested_tokens, stats.pinned_tokens, stats.backlog_tokens) == (1300, 1300, 0)
        (event,) = drain(events)
        assert event.version == 1 and event.data["tokens"] == 1300
        assert event.data["backlog_tokens"] == 0 and event.data["lag_s"] > 0
        assert event.data["rate_tps"] == stats.ingest_rate_tps
        assert lag_count() - lags_before == 1  # one version ingested

        # Five appends of 100 pile up behind a held request: the first
        # request ingests v2 alone (it was sent before the others arrived),
        # then chunks cover 1400 -> 1656 (v3, v4) and 1656 -> 1800 (v5, v6).
        g.hold(key)
        v2 = await engine.append(session.id, [rnd.randrange(2, 500) for _ in range(100)])
        await g.arrived(key)
        for _ in range(4):
            v6 = await engine.append(session.id, [rnd.randrange(2, 500) for _ in range(100)])
        assert (v2, v6) == (2, 6)
        stats = engine.get_session(session.id)
        assert (stats.backlog_tokens, stats.pending, stats.ingested_tokens) == (500, 5, 1300)
        assert stats.ingest_lag_s > 0
        g.release(key)
        await engine.wait_ingested(session.id, v6)
        calls = g.calls_of(key)[6:]
        assert [c.prompt_tokens for c in calls] == [1400, 1656, 1800]
        assert [c.computed for c in calls] == [100, 256, 144]
        assert [c.seen for c in calls] == [(1, 1300), (2, 1400), (4, 1656)]
        assert [(e.version, e.data["tokens"], e.data["backlog_tokens"]) for e in drain(events)] == [
            (2, 1400, 400), (4, 1600, 144), (6, 1800, 0),
        ]  # fmt: skip
        assert lag_count() - lags_before == 6  # one per appended version
        stats = engine.get_session(session.id)
        assert (stats.ingest_requests, stats.ingest_computed_tokens) == (9, 1800)
        assert (stats.ingested_tokens, stats.backlog_tokens, stats.ingest_lag_s) == (1800, 0, 0.0)

    # Token for token what stock vLLM answers on the whole log; the
    # question alone is computed (every chunk was pinned).
    assert len(session.tokens) == 1800
    for q in ([7, 8, 9], [rnd.randrange(2, 500) for _ in range(40)]):
        result = await engine.query(session.id, q, greedy())
        assert result.version == 6 and result.computed_tokens == len(q)
        assert result.token_ids == await reference(stock, session.tokens + q)
