"""Session metrics on vLLM's /metrics."""

from __future__ import annotations

import re
import time

import httpx


def metric(text: str, series: str) -> float:
    """A sample's value; 0 for a labelled series not yet created."""
    m = re.search(rf"^{re.escape(series)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_metrics_count_sessions_queries_and_pins(http: httpx.Client, open_session):
    before = http.get("/metrics").text
    assert "vllm_stateful_sessions " in before and "vllm_stateful_pinned_tokens " in before
    s = open_session([0] + [5] * 99)
    r = http.post(f"/v1/sessions/{s.id}/completions", headers=s.headers,
                  json={"prompt": [1, 2, 3], "max_tokens": 2, "temperature": 0})  # fmt: skip
    assert r.status_code == 200
    after = http.get("/metrics").text

    def delta(series: str) -> float:
        return metric(after, series) - metric(before, series)

    assert delta("vllm_stateful_sessions") == 1
    assert delta("vllm_stateful_pinned_tokens") == 100
    assert metric(after, "vllm_stateful_budget_tokens") == 3072
    assert delta('vllm_stateful_queries_total{source="engine"}') == 1
    assert delta("vllm_stateful_query_computed_tokens_total") == 3
    assert delta("vllm_stateful_ingest_computed_tokens_total") == 100


def summed(text: str, series: str) -> float:
    """A labelled series' value summed over its label sets (one engine here)."""
    return sum(float(v) for v in re.findall(rf"^{re.escape(series)}\{{[^}}]*\}} ([0-9.e+-]+)$",
                                            text, re.M))  # fmt: skip


def test_metrics_report_the_engine_time_in_steps(http: httpx.Client):
    """``vllm_stateful_engine_steps_total`` and ``..._step_seconds_total``
    (its rate: the engine's busy share) count the engine's model steps,
    passed from the engine through vLLM's connector stats: a stateless
    5-token completion on a quiet engine is exactly 5 steps (one prefill
    that yields the first token, then 4 decode steps; no speculation in
    the test server), and they took some of the time it was in flight."""
    steps, seconds = "vllm_stateful_engine_steps_total", "vllm_stateful_engine_step_seconds_total"

    def read() -> tuple[float, float]:
        text = http.get("/metrics").text
        return summed(text, steps), summed(text, seconds)

    # Quiet: nothing left running from earlier tests.
    before = read()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = read()
        if now == before:
            break
        before = now
    t0 = time.monotonic()
    model = http.get("/v1/models").json()["data"][0]["id"]
    r = http.post("/v1/completions", json={"model": model, "prompt": [1, 2, 3], "max_tokens": 5,
                                           "temperature": 0, "ignore_eos": True})  # fmt: skip
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    # The stats of a step reach the API server with that step's outputs.
    deadline = time.monotonic() + 10
    while read()[0] - before[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.1)
    after = read()
    assert after[0] - before[0] == 5
    assert 0 < after[1] - before[1] < elapsed
