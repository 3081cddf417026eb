"""The engine's time in steps as vLLM metrics: how busy the engine is.

A feed the engine ingests comfortably can still leave it busy nearly all
the time once questions and flash evaluations run beside it, and a
question arriving then waits for the step in flight (README, live
streams). ``vllm_stateful_engine_step_seconds_total`` makes that visible:
its rate is the engine's busy share (1.0: saturated).

The numbers travel vLLM's own path for connector telemetry: the
scheduler-side connector hands them over each step
(``get_kv_connector_stats``), they ride ``SchedulerStats`` to the API
server, where vLLM's Prometheus logger passes them to the metrics built by
``build_prom_metrics`` and its log line prints them every interval.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prometheus_client import REGISTRY
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine


@dataclass
class EngineTimeStats(KVConnectorStats):
    """Seconds spent in model steps and the number of steps, since the
    last hand-over."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {"step_seconds": 0.0, "steps": 0}

    def record(self, seconds: float) -> None:
        self.data["step_seconds"] += seconds
        self.data["steps"] += 1

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        self.data["step_seconds"] += other.data.get("step_seconds", 0.0)
        self.data["steps"] += other.data.get("steps", 0)
        return self

    def reduce(self) -> dict[str, int | float]:
        # vLLM's log line every interval: "KV Transfer metrics: ...".
        return {"engine_step_seconds": round(self.data["step_seconds"], 3),
                "engine_steps": self.data["steps"]}  # fmt: skip

    def is_empty(self) -> bool:
        return self.data["steps"] == 0


STEP_SECONDS, STEPS = "vllm_stateful_engine_step_seconds", "vllm_stateful_engine_steps"


def _unregister(names: set[str]) -> None:
    """Drop our collectors from an earlier engine in this process (tests,
    a restarted engine), as vLLM does for its own ``vllm:`` metrics
    (``unregister_vllm_metrics``): registering a name twice raises."""
    for collector in list(REGISTRY._collector_to_names):
        if getattr(collector, "_name", None) in names:
            REGISTRY.unregister(collector)


class EngineTimeMetrics(KVConnectorPromMetrics):
    def __init__(self, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        _unregister({STEP_SECONDS, STEPS})
        seconds = self._counter_cls(
            name=STEP_SECONDS,
            documentation="Seconds the engine spent in model steps (its rate: the busy share)",
            labelnames=labelnames,
        )
        steps = self._counter_cls(
            name=STEPS,
            documentation="Model steps the engine ran",
            labelnames=labelnames,
        )
        self.seconds = create_metric_per_engine(seconds, per_engine_labelvalues)
        self.steps = create_metric_per_engine(steps, per_engine_labelvalues)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        self.seconds[engine_idx].inc(transfer_stats_data.get("step_seconds", 0.0))
        self.steps[engine_idx].inc(transfer_stats_data.get("steps", 0))


class ReportsEngineTime:
    """The connector's part (scheduler side): the scheduler records each
    step's time; vLLM collects it every step and rebuilds it, and the
    metrics, in the API server from these class methods."""

    _engine_time: EngineTimeStats | None = None

    def record_step(self, seconds: float) -> None:
        if self._engine_time is None:
            self._engine_time = EngineTimeStats()
        self._engine_time.record(seconds)

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        stats, self._engine_time = self._engine_time, None
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats:
        return EngineTimeStats(data=dict(data or {}))

    @classmethod
    def build_prom_metrics(cls, vllm_config, metric_types, labelnames, per_engine_labelvalues):
        return EngineTimeMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)
