"""A client that hangs up stops its query: the engine does not keep
generating for nobody."""

from __future__ import annotations

import re
import time

import httpx

from .conftest import Server

# Long enough that finishing naturally takes far longer than the wait below.
MAX_TOKENS = 4000


def _running(server: Server) -> float:
    metrics = httpx.get(server.base_url + "/metrics", timeout=30).text
    found = re.findall(r"^vllm:num_requests_running\{[^}]*\} ([0-9.]+)$", metrics, re.M)
    assert found, "vllm:num_requests_running missing from /metrics"
    return sum(float(x) for x in found)


def test_hanging_up_a_stream_aborts_the_query(server: Server, open_session):
    # Streamed, so the gauge can be read while tokens flow. (A non-streamed
    # query is cancelled the same way, but on 2 cores a long generation can
    # keep the API process from answering /metrics until it ends.)
    s = open_session([0, 5, 6, 7])
    body = {"prompt": [8], "max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}
    headers = {"Authorization": f"Bearer {server.api_key}", **s.headers}
    path = f"{server.base_url}/v1/sessions/{s.id}/completions"
    with httpx.Client(headers=headers) as client:
        with client.stream("POST", path, json={**body, "stream": True}, timeout=30) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            next(lines), next(lines)  # tokens are flowing
            assert _running(server) == 1
        # Hung up.
    deadline = time.monotonic() + 3
    while _running(server) > 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _running(server) == 0
