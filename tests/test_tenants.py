"""Per-tenant caps on open sessions and on pinned KV tokens, on the real
engine: a tenant at its cap is refused with a typed error naming the cap,
while other tenants still create and grow; closing gives the room back."""

from __future__ import annotations

import pytest

from conftest import BLOCK_SIZE
from vllm_stateful import StatefulConfig, TenantLimitError

ASYNC = pytest.mark.asyncio(loop_scope="session")


def test_config_from_env(monkeypatch):
    monkeypatch.setenv("VLLM_STATEFUL_TENANT_HEADER", "X-Customer")
    monkeypatch.setenv("VLLM_STATEFUL_TENANT_MAX_SESSIONS", "3")
    monkeypatch.setenv("VLLM_STATEFUL_TENANT_MAX_TOKENS", "4096")
    cfg = StatefulConfig.from_env()
    assert (cfg.tenant_header, cfg.tenant_max_sessions, cfg.tenant_max_tokens) == (
        "X-Customer", 3, 4096,
    )
    default = StatefulConfig()
    assert (default.tenant_header, default.tenant_max_sessions, default.tenant_max_tokens) == (
        "X-Tenant", None, None,
    )
    with pytest.raises(ValueError, match="tenant_max_sessions must be at least 1, got 0"):
        StatefulConfig(tenant_max_sessions=0)


@ASYNC
async def test_session_cap_per_tenant(engine, monkeypatch):
    monkeypatch.setattr(engine.config, "tenant_max_sessions", 2)
    a1 = await engine.create_session([5] * 10, tenant="a")
    a2 = await engine.create_session([5] * 10, tenant="a")
    with pytest.raises(TenantLimitError) as refused:
        await engine.create_session([5] * 10, session_id="a3", tenant="a")
    assert refused.value.http_status == 429 and refused.value.code == "tenant_limit_exceeded"
    assert refused.value.message == (
        "tenant 'a' has 2 open sessions; the per-tenant cap tenant_max_sessions "
        "(VLLM_STATEFUL_TENANT_MAX_SESSIONS) is 2"
    )
    assert "a3" not in engine.sessions
    # Another tenant, and sessions without a tenant ("default"), still create.
    b1 = await engine.create_session([5] * 10, tenant="b")
    b2 = await engine.create_session([5] * 10, tenant="b")
    d1 = await engine.create_session([5] * 10)
    with pytest.raises(TenantLimitError, match="tenant 'b' has 2 open sessions"):
        await engine.create_session([5] * 10, tenant="b")
    assert [engine.get_session(s.id).tenant for s in (a1, a2, b1, b2, d1)] == [
        "a", "a", "b", "b", "default",
    ]
    assert len(engine.sessions) == 5
    # Closing one of a's sessions gives the room back to a only.
    await engine.close_session(a1.id)
    a3 = await engine.create_session([5] * 10, session_id="a3", tenant="a")
    assert engine.get_session(a3.id).tenant == "a"
    with pytest.raises(TenantLimitError, match="tenant 'a' has 2 open sessions"):
        await engine.create_session([5] * 10, tenant="a")
    assert sorted(s.tenant for s in engine.sessions.values()) == ["a", "a", "b", "b", "default"]


@ASYNC
async def test_token_cap_per_tenant(engine, monkeypatch):
    cap = 4 * BLOCK_SIZE  # 128 KV tokens
    monkeypatch.setattr(engine.config, "tenant_max_tokens", cap)
    a1 = await engine.create_session([5] * 64, tenant="a")  # 2 blocks
    a2 = await engine.create_session([5] * 60, tenant="a")  # 2 blocks
    assert engine.get_session(a2.id).pinned_tokens == 60
    with pytest.raises(TenantLimitError) as refused:
        await engine.create_session([5], session_id="a3", tenant="a")
    assert refused.value.message == (
        "tenant 'a' would pin 160 KV tokens (session 'a3' 32, its other sessions 128); "
        "the per-tenant cap tenant_max_tokens (VLLM_STATEFUL_TENANT_MAX_TOKENS) is 128"
    )
    # Growing past the cap is refused too; within its last block it is not.
    with pytest.raises(TenantLimitError, match=r"would pin 160 KV tokens .* is 128$"):
        await engine.append(a1.id, [6])
    assert engine.get_session(a1.id).version == 0
    version = await engine.append(a2.id, [6] * 4)  # 64 tokens: still 2 blocks
    assert version == 1
    await engine.wait_ingested(a2.id, 1)
    assert engine.get_session(a2.id).pinned_tokens == 64
    # Another tenant gets its own 128 tokens while a is at its cap.
    b1 = await engine.create_session([5] * 128, tenant="b")
    assert engine.get_session(b1.id).pinned_tokens == 128
    with pytest.raises(TenantLimitError, match="tenant 'b' would pin 160 KV tokens"):
        await engine.append(b1.id, [6])
    # Closing gives a's room back.
    await engine.close_session(a1.id)
    a3 = await engine.create_session([5] * 64, session_id="a3", tenant="a")
    assert engine.get_session(a3.id).pinned_tokens == 64
    check = await engine.reconcile()
    assert check.agree, check.details
    assert check.api_pinned_tokens == 64 + 64 + 128
