"""``GET /v1/sessions/{id}/events``: ingested events in version order, then
``closed``, which ends the stream."""

from __future__ import annotations

import asyncio
import json

import httpx

from vllm_stateful.client._wire import SSEParser

from .conftest import Server


async def test_events_arrive_in_version_order_for_a_burst_of_appends(server: Server):
    auth = {"Authorization": f"Bearer {server.api_key}"}
    async with httpx.AsyncClient(base_url=server.base_url, headers=auth, timeout=60) as http:
        r = await http.post("/v1/sessions", json={"prefix": [0, 5, 6, 7]})
        sid, headers = r.json()["id"], {"X-Session-Token": r.json()["token"]}
        async with http.stream("GET", f"/v1/sessions/{sid}/events", headers=headers) as stream:
            # Headers received: the server subscribed before it sent them.
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            versions = []
            for i in range(8):  # a burst: no waiting between appends
                r = await http.post(
                    f"/v1/sessions/{sid}/append",
                    json={"token_ids": [10 + i] * (5 + 13 * i)},
                    headers=headers,
                )
                versions.append(r.json()["version"])
            assert versions == list(range(1, 9))
            r = await http.post(
                f"/v1/sessions/{sid}/append?wait=true", json={"token_ids": [99]}, headers=headers
            )
            assert r.json() == {"version": 9, "ingested_version": 9}
            assert (await http.delete(f"/v1/sessions/{sid}", headers=headers)).status_code == 200

            events, parser = [], SSEParser()

            async def read() -> None:
                async for line in stream.aiter_lines():
                    if (msg := parser.feed(line)) is not None:
                        events.append((msg[0], json.loads(msg[1])))

            await asyncio.wait_for(read(), 30)  # the server ends the stream after "closed"

    names = [name for name, _ in events]
    assert all(name == body["type"] for name, body in events)
    assert names[-1] == "closed" and names.count("closed") == 1
    assert set(names[:-1]) == {"ingested"}
    ingested = [body["version"] for name, body in events if name == "ingested"]
    # Coalescing may skip versions, never reorders them; the last is there.
    assert ingested == sorted(set(ingested)) and ingested[-1] == 9
    assert events[-1][1] == {
        "type": "closed",
        "session_id": sid,
        "version": 9,
        "data": {"reason": "closed"},
    }


async def test_client_events_iterator(server: Server):
    from vllm_stateful.client import AsyncClient

    async with AsyncClient(server.base_url, api_key=server.api_key) as client:
        s = await client.create_session([0, 5])
        events = s.events()
        first = asyncio.ensure_future(events.__anext__())
        await asyncio.sleep(1.0)  # let the subscription reach the server
        await s.append([6] * 40, wait=True)
        event = await asyncio.wait_for(first, 30)
        assert (event["type"], event["version"], event["data"]["tokens"]) == ("ingested", 1, 42)
        await s.close()
        rest = [e async for e in events]
        assert rest[-1]["type"] == "closed"
