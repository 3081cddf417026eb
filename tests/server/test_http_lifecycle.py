"""Session lifecycle over HTTP: a client that hangs up during create, a
DELETE racing expiry, commit conflicts, and the reconciliation route. After
each scenario the engine's pins agree with the API's accounting and every
KV block is back.

Waits poll for a positive condition with a deadline; nothing is concluded
from a sleep.
"""

from __future__ import annotations

import json
import re
import socket
import time
from typing import Callable
from urllib.parse import urlsplit

import httpx

from .conftest import Server


def wait_for(predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def reconcile(http: httpx.Client) -> dict:
    r = http.get("/v1/stateful/reconcile")
    assert r.status_code == 200, r.text
    return r.json()


def metric(server: Server, name: str) -> float:
    text = httpx.get(server.base_url + "/metrics", timeout=30).text
    found = re.findall(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+-]+)$", text, re.M)
    assert found, f"{name} missing from /metrics"
    return sum(float(x) for x in found)


def settled(http: httpx.Client, before: dict) -> None:
    """Back where ``before`` was: same open sessions, nothing ending, the
    engine agrees, the same free blocks."""
    wait_for(
        lambda: (now := reconcile(http))["ending_sessions"] == 0
        and now["open_sessions"] == before["open_sessions"]
        and now["skipped"] == 0
    )
    after = reconcile(http)
    assert after["agree"] and after["mismatches"] == [], after
    assert after["free_blocks"] == before["free_blocks"]
    assert after["engine_pinned_tokens"] == after["api_pinned_tokens"] == before["api_pinned_tokens"]


def test_reconcile_route_needs_the_api_key_and_agrees(server: Server, http: httpx.Client, open_session):
    r = httpx.get(server.base_url + "/v1/stateful/reconcile", timeout=30)
    assert r.status_code == 401
    before = reconcile(http)
    assert before["agree"] and before["object"] == "stateful.reconciliation"
    s = open_session([0] + [5] * 99)  # 100 tokens: 4 blocks of 32
    now = reconcile(http)
    assert now["agree"] and now["open_sessions"] == before["open_sessions"] + 1
    assert now["engine_pinned_tokens"] == before["engine_pinned_tokens"] + 100
    assert now["pinned_blocks"] == before["pinned_blocks"] + 4
    assert now["free_blocks"] == before["free_blocks"] - 4
    assert http.get(f"/v1/sessions/{s.id}", headers=s.headers).json()["state"] == "active"
    assert metric(server, "vllm_stateful_reconcile_mismatches") == 0
    assert http.delete(f"/v1/sessions/{s.id}", headers=s.headers).status_code == 200
    settled(http, before)


def test_client_hanging_up_during_create_rolls_it_back(server: Server, http: httpx.Client):
    before = reconcile(http)
    rolled_back = metric(server, "vllm_stateful_creates_rolled_back_total")
    # 3000 tokens: ingested in many paced engine steps, long enough to hang
    # up while it runs (checked below, not assumed).
    body = json.dumps({"prefix": [0] + [7] * 2999}).encode()
    url = urlsplit(server.base_url)
    head = (
        f"POST /v1/sessions HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    # Hang up while the server is creating it (one more open session, no
    # answer yet). The tiny model ingests 3,000 tokens in a fraction of a
    # second, so the create may win the race; then that session is closed
    # and the test tries again. A rollback must be seen within five tries.
    for _ in range(5):
        with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
            sock.sendall(head + body)
            wait_for(lambda: reconcile(http)["open_sessions"] == before["open_sessions"] + 1)
            sock.setblocking(False)
            try:
                early = sock.recv(65536)
            except BlockingIOError:
                early = None
            if early is None:
                break  # hung up before the answer
            sock.setblocking(True)
            while not early.rstrip().endswith(b"}"):
                early += sock.recv(65536)
        created = json.loads(early.split(b"\r\n\r\n", 1)[1])
        r = http.delete(f"/v1/sessions/{created['id']}", headers={"X-Session-Token": created["token"]})
        assert r.status_code == 200, r.text
        settled(http, before)
    assert early is None, "every create finished before the client could hang up"
    wait_for(lambda: metric(server, "vllm_stateful_creates_rolled_back_total") == rolled_back + 1)
    # Hung up. The create is cancelled and rolled back: no session, no pin.
    settled(http, before)
    assert metric(server, "vllm_stateful_creates_rolled_back_total") == rolled_back + 1


def test_delete_racing_expiry_does_not_stop_expiry(http: httpx.Client):
    before = reconcile(http)

    def create(ttl_s: float) -> tuple[str, dict]:
        r = http.post("/v1/sessions", json={"prefix": [0, 4, 4], "ttl_s": ttl_s})
        assert r.status_code == 201, r.text
        return r.json()["id"], {"X-Session-Token": r.json()["token"]}

    def gone(sid: str, headers: dict) -> bool:
        r = http.get(f"/v1/sessions/{sid}", headers=headers)
        assert r.status_code in (200, 404), r.text
        return r.status_code == 404

    a, b = create(0.3), create(0.3)
    wait_for(lambda: gone(*a))  # A expired: B is expiring now or in the next pass
    r = http.delete(f"/v1/sessions/{b[0]}", headers=b[1])
    assert r.status_code in (200, 404), r.text
    if r.status_code == 404:
        assert r.json()["error"]["code"] in ("session_not_found", "session_closed")
    # Expiry still runs afterwards.
    c = create(0.3)
    wait_for(lambda: gone(*c))
    settled(http, before)


def test_commit_refused_when_the_session_moved_on(http: httpx.Client):
    before = reconcile(http)
    ask = {"prompt": [1, 2], "max_tokens": 2, "temperature": 0, "commit": True}

    def session() -> tuple[str, dict]:
        r = http.post("/v1/sessions", json={"prefix": [0, 5, 6]})
        assert r.status_code == 201, r.text
        return f"/v1/sessions/{r.json()['id']}", {"X-Session-Token": r.json()["token"]}

    # Append 2,000 tokens and at once ask with commit. If the append is not
    # ingested when the question arrives, the commit is refused (409) and
    # nothing is appended; if it already is, the answer saw it and the commit
    # lands on top. Both outcomes are checked exactly; the refusal must show
    # up within a few tries (ingestion takes ~63 engine steps, the question
    # one HTTP round trip).
    refused = None
    for _ in range(10):
        url, headers = session()
        r = http.post(url + "/append", json={"token_ids": [9] * 2000}, headers=headers)
        assert r.status_code == 202 and r.json()["version"] == 1, r.text
        r = http.post(url + "/completions", json=ask, headers=headers)
        stats = http.get(url, headers=headers).json()
        if r.status_code == 409:
            refused = r.json()["error"]
            assert (stats["tokens"], stats["version"]) == (2003, 1)
            break
        assert r.status_code == 200, r.text
        assert (r.json()["session"]["version"], r.json()["session"]["committed_version"]) == (1, 2)
        assert (stats["tokens"], stats["version"]) == (2007, 2)
        assert http.delete(url, headers=headers).status_code == 200
    assert refused is not None, "every append was ingested before the next question arrived"
    assert (refused["code"], refused["type"]) == ("commit_conflict", "conflict_error")
    assert "consistency='latest'" in refused["message"]
    # With consistency "latest" the answer waits for version 1 and commits.
    r = http.post(url + "/completions", json={**ask, "consistency": "latest"}, headers=headers)
    assert r.status_code == 200, r.text
    assert (r.json()["session"]["version"], r.json()["session"]["committed_version"]) == (1, 2)
    assert http.delete(url, headers=headers).status_code == 200
    settled(http, before)
