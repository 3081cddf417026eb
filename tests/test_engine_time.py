"""The engine-time metrics (kv/engine_time.py) as vLLM's Prometheus logger
builds them in the API process: once per engine, so twice in a process that
starts a second engine (the tests do, and so does a restart)."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from vllm_stateful.kv.connector import StatefulConnector


def test_engine_time_metrics_are_built_again_for_a_second_engine():
    types = {Gauge: Gauge, Counter: Counter, Histogram: Histogram}
    labels = {"model_name": "m", "engine": "0"}
    config = SimpleNamespace(kv_transfer_config=None)
    for steps, seconds in ((3, 0.25), (2, 0.5)):
        metrics = StatefulConnector.build_prom_metrics(config, types, list(labels), {0: ["m", "0"]})
        # What the scheduler-side connector hands over, rebuilt from its dict.
        stats = StatefulConnector.build_kv_connector_stats(None)
        for _ in range(steps):
            stats.record(seconds / steps)
        data = StatefulConnector.build_kv_connector_stats(stats.to_dict()).data
        metrics.observe(data, 0)
        # Each engine's counters start from zero.
        assert REGISTRY.get_sample_value("vllm_stateful_engine_steps_total", labels) == steps
        value = REGISTRY.get_sample_value("vllm_stateful_engine_step_seconds_total", labels)
        assert abs(value - seconds) < 1e-9
