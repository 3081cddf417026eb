"""On a real ``vllm-stateful serve``: the lag and rate fields of stats and
``ingested`` events, the live-stream metrics, and chunked ingestion's exact
counts (``ingest_chunk_tokens`` 256, set for the tests in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import json

import httpx

from vllm_stateful.client._wire import SSEParser

from .conftest import Server


async def test_lag_rate_and_chunks_over_http(server: Server):
    auth = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth, timeout=120) as http:
        r = await http.post("/v1/sessions", json={"prefix": [0] + [5] * 599})
        sid, headers = r.json()["id"], {"X-Session-Token": r.json()["token"]}
        stats = (await http.get(f"/v1/sessions/{sid}", headers=headers)).json()
        # 600 prefix tokens in chunks of 256: 256 + 256 + 88.
        assert (stats["ingest_requests"], stats["ingested_tokens"], stats["backlog_tokens"]) == (3, 600, 0)
        assert stats["ingest_lag_s"] == 0.0 and stats["ingest_rate_tps"] > 0
        async with http.stream("GET", f"/v1/sessions/{sid}/events", headers=headers) as stream:
            r = await http.post(f"/v1/sessions/{sid}/append?wait=true",
                                json={"token_ids": [6] * 300}, headers=headers)  # fmt: skip
            assert r.json() == {"version": 1, "ingested_version": 1}
            assert (await http.delete(f"/v1/sessions/{sid}", headers=headers)).status_code == 200
            events, parser = [], SSEParser()

            async def read() -> None:
                async for line in stream.aiter_lines():
                    if (msg := parser.feed(line)) is not None:
                        events.append(json.loads(msg[1]))

            await asyncio.wait_for(read(), 30)
        (ingested,) = [e for e in events if e["type"] == "ingested"]
        assert ingested["version"] == 1 and ingested["data"]["tokens"] == 900
        assert ingested["data"]["backlog_tokens"] == 0 and ingested["data"]["lag_s"] > 0
        assert ingested["data"]["rate_tps"] > 0
        metrics = (await http.get("/metrics")).text
        for series in ("vllm_stateful_backlog_tokens ", "vllm_stateful_ingest_lag_seconds_count ",
                       "vllm_stateful_appends_rejected_total "):  # fmt: skip
            assert f"\n{series}" in metrics, series
