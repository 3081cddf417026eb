"""A failed ingest request: waiters get a typed error, the session stays
intact, the error is cleared as soon as a retry starts, and the next append
(or ``retry_ingest``) retries, computing only what is not yet pinned."""

from __future__ import annotations

import asyncio

import pytest

from helpers import greedy, reference
from rpc_gate import gate
from vllm_stateful import IngestionFailedError
from vllm_stateful.protocol import Op

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_failed_ingest_is_typed_and_retried(engine, stock):
    with gate(engine.ingestor, Op.APPEND) as g:
        s = await engine.create_session([5] * 50)
        g.fail(s.key)
        v1 = await engine.append(s.id, [6] * 100)
        with pytest.raises(IngestionFailedError) as info:
            await engine.wait_ingested(s.id, v1)
        err = info.value
        assert err.http_status == 503 and err.code == "ingestion_failed"
        assert err.retry_after_s == 1.0 and "injected" in err.message
        stats = engine.get_session(s.id)
        assert (stats.tokens, stats.version, stats.ingested_version) == (150, 1, 0)
        assert (stats.ingested_tokens, stats.pinned_tokens, stats.backlog_tokens) == (50, 50, 100)
        # Still the current state: a new waiter sees it too.
        with pytest.raises(IngestionFailedError):
            await engine.wait_ingested(s.id, v1)

        # A retry clears the error as soon as it starts.
        g.hold(s.key)
        assert await engine.retry_ingest(s.id) == 1
        await g.arrived(s.key)
        assert s.ingest_error is None
        waiter = asyncio.ensure_future(engine.wait_ingested(s.id, v1))
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiter.done()
        g.release(s.key)
        assert await waiter == 1
        stats = engine.get_session(s.id)
        # The failed request never reached the engine: 50 + 100 computed.
        assert (stats.ingest_requests, stats.ingest_computed_tokens) == (2, 150)

        # A failure between chunks keeps the chunks already pinned; the next
        # append retries from there. 600 from 150: chunks end 406 | 662, 750.
        g.fail(s.key, after=1)
        v2 = await engine.append(s.id, [7] * 600)
        with pytest.raises(IngestionFailedError):
            await engine.wait_ingested(s.id, v2)
        stats = engine.get_session(s.id)
        assert (stats.ingested_version, stats.ingested_tokens, stats.pinned_tokens) == (1, 406, 406)
        assert (stats.backlog_tokens, stats.ingest_computed_tokens) == (344, 406)
        v3 = await engine.append(s.id, [8] * 10)
        assert await engine.wait_ingested(s.id, v3) == 3
        assert [c.prompt_tokens for c in g.calls_of(s.key)[-2:]] == [662, 760]
        assert [c.computed for c in g.calls_of(s.key)[-2:]] == [256, 98]
        stats = engine.get_session(s.id)
        assert (stats.ingest_requests, stats.ingest_computed_tokens) == (5, 760)
        assert (stats.backlog_tokens, stats.ingest_lag_s) == (0, 0.0)

    assert s.tokens == [5] * 50 + [6] * 100 + [7] * 600 + [8] * 10
    result = await engine.query(s.id, [9, 9, 9], greedy())
    assert result.computed_tokens == 3
    assert result.token_ids == await reference(stock, s.tokens + [9, 9, 9])
