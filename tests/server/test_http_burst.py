"""A burst of 1,000 concurrent session creates past the budget, over real
HTTP against the shared server: every answer is 201 or 429 (exactly as many
201s as the budget holds), nothing hangs, every created session closes, the
engine agrees with the accounting, and a session opened before the burst
answers token-for-token as it did before."""

from __future__ import annotations

import asyncio
import collections
import time

import httpx

from .conftest import BLOCK_SIZE, BUDGET_TOKENS, Opened, Server

BURST = 1000
BURST_TIMEOUT_S = 60.0
ASK = {"prompt": " and then", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
       "return_token_ids": True}  # fmt: skip


def _answer(http: httpx.Client, s: Opened) -> list[int]:
    r = http.post(f"/v1/sessions/{s.id}/completions", json=ASK, headers=s.headers)
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["token_ids"]
    assert len(ids) == ASK["max_tokens"]
    return ids


def test_burst_of_creates_past_the_budget(server: Server, http: httpx.Client, open_session):
    before = http.get("/v1/stateful/reconcile").json()
    assert before["agree"] and before["open_sessions"] == before["ending_sessions"] == 0
    ref = open_session("The reference session holds this text.")
    expected_answer = _answer(http, ref)
    ref_tokens = http.get(f"/v1/sessions/{ref.id}", headers=ref.headers).json()["tokens"]
    ref_cost = -(-ref_tokens // BLOCK_SIZE) * BLOCK_SIZE
    # Each burst session pins one block ("burst N" with BOS is a few tokens).
    admitted = (BUDGET_TOKENS - ref_cost) // BLOCK_SIZE
    assert 0 < admitted < BURST

    async def burst() -> tuple[list[httpx.Response], int]:
        in_flight = peak = 0
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        async with httpx.AsyncClient(
            base_url=server.base_url, limits=limits, timeout=BURST_TIMEOUT_S,
            headers={"Authorization": f"Bearer {server.api_key}"},
        ) as client:  # fmt: skip
            go = asyncio.Event()

            async def create(i: int) -> httpx.Response:
                nonlocal in_flight, peak
                await go.wait()
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await client.post("/v1/sessions", json={"prefix": f"burst {i}"})
                finally:
                    in_flight -= 1

            tasks = [asyncio.ensure_future(create(i)) for i in range(BURST)]
            await asyncio.sleep(0)
            go.set()
            responses = await asyncio.wait_for(asyncio.gather(*tasks), BURST_TIMEOUT_S)
        return responses, peak

    start = time.monotonic()
    responses, peak = asyncio.run(burst())
    elapsed = time.monotonic() - start
    assert peak == BURST  # every request was in flight at once (no pool queueing)
    statuses = collections.Counter(r.status_code for r in responses)
    assert set(statuses) <= {201, 429}, statuses
    assert statuses == {201: admitted, 429: BURST - admitted}, (statuses, elapsed)
    codes = collections.Counter(r.json()["error"]["code"] for r in responses if r.status_code == 429)
    assert codes == {"session_budget_exceeded": BURST - admitted}
    created = [Opened(r.json()["id"], r.json()["token"]) for r in responses if r.status_code == 201]
    assert len({s.id for s in created}) == admitted

    during = http.get("/v1/stateful/reconcile").json()
    assert during["agree"], during
    assert during["open_sessions"] == admitted + 1
    assert during["api_pinned_tokens"] == during["engine_pinned_tokens"]

    async def close_all() -> list[int]:
        async with httpx.AsyncClient(
            base_url=server.base_url, timeout=BURST_TIMEOUT_S,
            limits=httpx.Limits(max_connections=admitted),
            headers={"Authorization": f"Bearer {server.api_key}"},
        ) as client:  # fmt: skip
            rs = await asyncio.wait_for(asyncio.gather(*(
                client.delete(f"/v1/sessions/{s.id}", headers=s.headers) for s in created
            )), BURST_TIMEOUT_S)  # fmt: skip
        return [r.status_code for r in rs]

    assert asyncio.run(close_all()) == [200] * admitted
    after = http.get("/v1/stateful/reconcile").json()
    assert after["agree"], after
    assert (after["open_sessions"], after["ending_sessions"], after["skipped"]) == (1, 0, 0)
    assert after["api_pinned_tokens"] == after["engine_pinned_tokens"] == ref_tokens
    assert after["engine_pins"] == 1
    assert after["pinned_blocks"] == ref_cost // BLOCK_SIZE
    # The reference session answers exactly as before the burst.
    assert _answer(http, ref) == expected_answer
