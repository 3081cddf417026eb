"""Session metrics on vLLM's /metrics."""

from __future__ import annotations

import re

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
