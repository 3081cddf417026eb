"""Per-tenant caps over HTTP: a server of its own, started with a tenant
header of its own and a cap of 2 sessions per tenant."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server.conftest import (
    BUDGET_TOKENS,
    Server,
    _free_port,
    running,
    server_env,
    tiny_serve_args,
    vllm_command,
)


@pytest.fixture(scope="module")
def tenant_server(tiny_model_path: str) -> Iterator[Server]:
    port, api_key = _free_port(), "sk-tenants"
    cmd = vllm_command() + tiny_serve_args(tiny_model_path, port)
    cmd += ["--plugin", "stateful", "--api-key", api_key]
    env = server_env(
        VLLM_STATEFUL_BUDGET_TOKENS=str(BUDGET_TOKENS),
        VLLM_STATEFUL_TENANT_HEADER="X-Customer",
        VLLM_STATEFUL_TENANT_MAX_SESSIONS="2",
    )
    with running(cmd, env, port) as (base, _log):
        yield Server(base_url=base, api_key=api_key, model=tiny_model_path)


def test_tenant_cap_over_http(tenant_server: Server):
    with tenant_server.http() as http:
        opened = []

        def create(tenant: str | None) -> object:
            headers = {} if tenant is None else {"X-Customer": tenant}
            r = http.post("/v1/sessions", json={"prefix": "hello"}, headers=headers)
            if r.status_code == 201:
                opened.append((r.json()["id"], r.json()["token"]))
            return r

        assert [create("acme").status_code for _ in range(2)] == [201, 201]
        refused = create("acme")
        assert refused.status_code == 429, refused.text
        error = refused.json()["error"]
        assert error["code"] == "tenant_limit_exceeded"
        assert error["message"] == (
            "tenant 'acme' has 2 open sessions; the per-tenant cap tenant_max_sessions "
            "(VLLM_STATEFUL_TENANT_MAX_SESSIONS) is 2"
        )
        # Another tenant, and a caller without the header, still create.
        assert create("globex").status_code == 201
        assert create(None).status_code == 201
        tenants = [
            http.get(f"/v1/sessions/{sid}", headers={"X-Session-Token": tok}).json()["tenant"]
            for sid, tok in opened
        ]
        assert tenants == ["acme", "acme", "globex", "default"]
        for sid, tok in opened:
            assert http.delete(f"/v1/sessions/{sid}", headers={"X-Session-Token": tok}).status_code == 200
        assert create("acme").status_code == 201
        sid, tok = opened[-1]
        assert http.delete(f"/v1/sessions/{sid}", headers={"X-Session-Token": tok}).status_code == 200
        check = http.get("/v1/stateful/reconcile").json()
        assert check["agree"] and check["open_sessions"] == 0 and check["engine_pins"] == 0
