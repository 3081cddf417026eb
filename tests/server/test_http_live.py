"""Live-stream behaviour over HTTP: 429 with Retry-After past a backlog
bound, 503 with Retry-After when ingestion failed, the client's typed errors,
bounded-staleness flash reads, and the lag and rate fields.

These run the real session routes in-process (an ASGI transport, no
network) on the shared real engine, so that a backlog or a failed ingest
request can be produced deterministically with the test-only RPC gate.
"""

from __future__ import annotations

import math

import httpx
import pytest
from fastapi import FastAPI

from helpers import reference
from rpc_gate import gate
from vllm_stateful.client import AsyncClient, BacklogFullError, IngestionFailedError
from vllm_stateful.protocol import Op
from vllm_stateful.server.routes import router
from vllm_stateful.server.state import ServerState

pytestmark = pytest.mark.asyncio(loop_scope="session")

TEN_MINUTES_MS = 600_000


def app_for(engine) -> FastAPI:
    app = FastAPI()
    app.include_router(router)
    app.state.stateful_stock_routes = {}
    app.state.stateful = ServerState(
        engine=engine,
        model_names=["tiny"],
        model_config=engine.engine.model_config,
        chat_template=None,
        model_defaults={},
    )
    return app


def in_process(engine) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app_for(engine))
    return httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1", timeout=120)


def assert_error(r: httpx.Response, status: int, code: str, error_type: str) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == code and err["type"] == error_type
    return err


async def test_backlog_full_is_429_and_failed_ingest_is_503(engine, monkeypatch):
    monkeypatch.setattr(engine.config, "max_backlog_tokens", 300)
    async with in_process(engine) as http:
        with gate(engine.ingestor, Op.APPEND) as g:
            r = await http.post("/v1/sessions", json={"prefix": [3] * 40})
            assert r.status_code == 201, r.text
            sid, token = r.json()["id"], r.json()["token"]
            h = {"X-Session-Token": token}
            session = engine.sessions[sid]
            url = f"/v1/sessions/{sid}/append"

            g.hold(session.key)
            assert (await http.post(url, headers=h, json={"token_ids": [4] * 200})).status_code == 202
            await g.arrived(session.key)
            stats = (await http.get(f"/v1/sessions/{sid}", headers=h)).json()
            assert (stats["backlog_tokens"], stats["ingested_tokens"], stats["version"]) == (200, 40, 1)
            assert stats["ingest_lag_s"] > 0 and stats["ingest_rate_tps"] == session.ingest_rate_tps

            r = await http.post(url, headers=h, json={"token_ids": [5] * 200})
            err = assert_error(r, 429, "ingest_backlog_full", "rate_limit_error")
            assert "max_backlog_tokens=300" in err["message"]
            expected = max(1, math.ceil((200 + 200 - 300) / session.ingest_rate_tps))
            assert r.headers["Retry-After"] == str(expected)
            # The client raises the same typed error, with the server's estimate.
            client = AsyncClient("http://127.0.0.1", http=http)
            with pytest.raises(BacklogFullError) as info:
                await client.session(sid, token).append([5] * 200)
            assert info.value.retry_after_s == float(expected)
            assert len(session.tokens) == 240 and session.version == 1  # nothing changed

            # The held request fails: a "latest" read gets 503 while it stays failed.
            g.fail(session.key)
            g.release(session.key)
            with pytest.raises(IngestionFailedError):
                await engine.wait_ingested(sid, 1)
            body = {"prompt": [1, 2], "max_tokens": 2, "consistency": "latest"}
            r = await http.post(f"/v1/sessions/{sid}/completions", headers=h, json=body)
            assert_error(r, 503, "ingestion_failed", "service_unavailable_error")
            assert r.headers["Retry-After"] == "1"
            with pytest.raises(IngestionFailedError) as info:
                await client.session(sid, token).query([1, 2], max_tokens=2, consistency="latest")
            assert info.value.retry_after_s == 1.0
            # An append retries; when that retry fails too, ?wait=true says so.
            g.fail(session.key)
            r = await http.post(url + "?wait=true", headers=h, json={"token_ids": [6] * 10})
            assert_error(r, 503, "ingestion_failed", "service_unavailable_error")
            assert r.headers["Retry-After"] == "1"

            # The next append retries; everything acknowledged is there.
            r = await http.post(url + "?wait=true", headers=h, json={"token_ids": [7] * 5})
            assert r.status_code == 200 and r.json()["ingested_version"] == 3
            stats = (await http.get(f"/v1/sessions/{sid}", headers=h)).json()
            assert (stats["tokens"], stats["ingested_tokens"], stats["backlog_tokens"]) == (255, 255, 0)
            assert stats["ingest_lag_s"] == 0.0


async def test_bounded_staleness_over_http(engine, stock, monkeypatch):
    # The answer from an evaluation request of its own, which the gate
    # below can hold (it does not ride an ingestion request).
    monkeypatch.setattr(engine.config, "flash_with_ingest", False)
    q = [21, 22, 23]
    greedy = {"max_tokens": 4, "temperature": 0, "ignore_eos": True}
    async with in_process(engine) as http:
        r = await http.post("/v1/sessions", json={"prefix": [5] * 50, "flash": [
            {"prompt": q, "id": "f", **greedy, "max_staleness_ms": TEN_MINUTES_MS}]})  # fmt: skip
        assert r.status_code == 201, r.text
        sid, h = r.json()["id"], {"X-Session-Token": r.json()["token"]}
        session = engine.sessions[sid]
        (info,) = (await http.get(f"/v1/sessions/{sid}/flash", headers=h)).json()["data"]
        assert info["max_staleness_ms"] == TEN_MINUTES_MS
        r = await http.post(f"/v1/sessions/{sid}/completions", headers=h,
                            json={"prompt": q, **greedy, "max_staleness_ms": -1})  # fmt: skip
        assert_error(r, 400, "invalid_request", "invalid_request_error")

        events = engine.subscribe(sid)
        while (await events.get()).type != "flash":
            pass
        with gate(engine.flash, Op.FLASH) as g:
            g.hold(session.key)
            r = await http.post(f"/v1/sessions/{sid}/append?wait=true", headers=h,
                                json={"token_ids": [7] * 33})  # fmt: skip
            assert r.json()["ingested_version"] == 1
            paths = (f"/v1/sessions/{sid}/completions", "/v1/completions")
            for path in paths:
                # The flash query's default bound: its v0 answer, stale.
                r = await http.post(path, headers=h, json={"prompt": q, **greedy, "session_id": sid})
                s = r.json()["session"]
                assert s["flash"] and s["version"] == 0 and s["computed_tokens"] == 0
                assert s["staleness_ms"] > 0 and s["computed_at"] is not None
                assert r.json()["choices"][0]["text"] is not None
                # A bound of 0 in the body: the newest version, computed.
                r = await http.post(path, headers=h, json={
                    "prompt": q, **greedy, "session_id": sid, "max_staleness_ms": 0,
                    "return_token_ids": True})  # fmt: skip
                s = r.json()["session"]
                assert not s["flash"] and s["version"] == 1 and s["staleness_ms"] == 0.0
                assert s["computed_tokens"] == len(q)
                assert r.json()["choices"][0]["token_ids"] == await reference(
                    stock, session.tokens_at(1) + q, 4
                )
            # Streams report the stale hit in their session object too.
            async with http.stream("POST", paths[0], headers=h,
                                   json={"prompt": q, **greedy, "stream": True}) as resp:  # fmt: skip
                lines = [line async for line in resp.aiter_lines() if line.startswith("data: {")]
            assert '"staleness_ms"' in lines[0] and '"flash":true' in lines[0].replace(" ", "")
