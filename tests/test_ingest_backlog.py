"""Backlog bounds: past the per-session or the server-wide bound of
appended-but-not-ingested tokens an append is refused with a typed error
and a retry estimate, and a refused append changes nothing."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from helpers import greedy, reference
from rpc_gate import gate
from vllm_stateful import BacklogFullError, InvalidInputError
from vllm_stateful.protocol import Op

pytestmark = pytest.mark.asyncio(loop_scope="session")


def rejected() -> float:
    return REGISTRY.get_sample_value("vllm_stateful_appends_rejected_total") or 0.0


async def test_backlog_bounds_refuse_and_lose_nothing(engine, stock, monkeypatch):
    monkeypatch.setattr(engine.config, "max_backlog_tokens", 300)
    with gate(engine.ingestor, Op.APPEND) as g:
        a = await engine.create_session([3] * 40)
        rate_a = a.ingest_rate_tps
        assert rate_a is not None and rate_a > 0  # measured on the prefix
        g.hold(a.key)
        await engine.append(a.id, [4] * 100)
        await g.arrived(a.key)  # in flight, not ingested: backlog 100
        assert await engine.append(a.id, [5] * 150) == 2  # backlog 250
        before = (list(a.tokens), a.version, rejected())

        with pytest.raises(BacklogFullError) as info:
            await engine.append(a.id, [6] * 100)  # 350 > 300
        err = info.value
        assert err.http_status == 429 and err.code == "ingest_backlog_full"
        assert "max_backlog_tokens=300" in err.message and "250 tokens" in err.message
        assert f"{rate_a:.0f} tokens/s" in err.message
        assert err.retry_after_s == pytest.approx((250 + 100 - 300) / rate_a)
        assert (list(a.tokens), a.version) == before[:2] and rejected() == before[2] + 1

        assert await engine.append(a.id, [6] * 50) == 3  # exactly at the bound
        with pytest.raises(BacklogFullError):
            await engine.append(a.id, [6])
        # Larger than the bound on its own: waiting would never help.
        with pytest.raises(InvalidInputError, match="split it"):
            await engine.append(a.id, [6] * 301)
        stats = engine.get_session(a.id)
        assert (stats.backlog_tokens, stats.ingested_tokens, stats.version) == (300, 40, 3)
        assert stats.ingest_lag_s > 0

        # The server-wide bound counts every session's backlog.
        monkeypatch.setattr(engine.config, "max_backlog_tokens", 10_000)
        monkeypatch.setattr(engine.config, "max_backlog_tokens_total", 400)
        b = await engine.create_session([7] * 10)
        rate_b = b.ingest_rate_tps
        g.hold(b.key)
        await engine.append(b.id, [8] * 60)  # total 360
        await g.arrived(b.key)
        with pytest.raises(BacklogFullError) as info:
            await engine.append(b.id, [8] * 50)  # 410 > 400
        assert "max_backlog_tokens_total=400" in info.value.message
        assert "360 tokens" in info.value.message
        # Both sessions ingest concurrently: their rates add up.
        assert info.value.retry_after_s == pytest.approx((360 + 50 - 400) / (rate_a + rate_b))
        assert b.version == 1 and len(b.tokens) == 70

        g.release(a.key)
        g.release(b.key)
        await engine.wait_ingested(a.id, 3)
        await engine.wait_ingested(b.id, 1)

    # Nothing acknowledged was lost.
    assert a.tokens == [3] * 40 + [4] * 100 + [5] * 150 + [6] * 50
    stats = engine.get_session(a.id)
    assert (stats.backlog_tokens, stats.ingest_lag_s, stats.ingested_tokens) == (0, 0.0, 340)
    result = await engine.query(a.id, [9, 10], greedy())
    assert result.computed_tokens == 2
    assert result.token_ids == await reference(stock, a.tokens + [9, 10])
