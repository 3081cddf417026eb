"""Prometheus metrics of the session layer, served on vLLM's ``/metrics``
next to vLLM's own (they share prometheus_client's default registry)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import Counter, Gauge, Histogram

if TYPE_CHECKING:
    from vllm_stateful.engine import StatefulEngine

QUERIES = Counter(
    "vllm_stateful_queries", "Session queries answered", ["source"]  # engine | flash_cache
)
QUERY_COMPUTED_TOKENS = Counter(
    "vllm_stateful_query_computed_tokens", "Prompt tokens computed by session queries"
)
INGEST_REQUESTS = Counter("vllm_stateful_ingest_requests", "Engine requests that ingested appends")
INGEST_COMPUTED_TOKENS = Counter(
    "vllm_stateful_ingest_computed_tokens", "Prompt tokens computed to ingest appends"
)
FLASH_EVALUATIONS = Counter("vllm_stateful_flash_evaluations", "Flash query evaluations run")
FLASH_WITH_INGEST = Counter(
    "vllm_stateful_flash_evaluations_with_ingest",
    "Flash query evaluations that rode their session's ingestion request (no request of their own)",
)
SESSIONS = Gauge("vllm_stateful_sessions", "Open sessions")
PINNED_TOKENS = Gauge("vllm_stateful_pinned_tokens", "KV tokens pinned by sessions")
BUDGET_TOKENS = Gauge("vllm_stateful_budget_tokens", "KV tokens sessions may pin together")
FLASH_QUERIES = Gauge("vllm_stateful_flash_queries", "Registered flash queries")
SESSIONS_ENDING = Gauge(
    "vllm_stateful_sessions_ending",
    "Sessions closing or whose release failed: their pins are not yet released",
)
RELEASE_FAILURES = Counter(
    "vllm_stateful_release_failures", "Session releases whose CLOSE the engine did not acknowledge"
)
CREATES_ROLLED_BACK = Counter(
    "vllm_stateful_creates_rolled_back",
    "Session creates undone because the prefix failed or the caller went away",
)
RECONCILE_MISMATCHES = Gauge(
    "vllm_stateful_reconcile_mismatches",
    "Disagreements between engine-side pins and API-side accounting at the last reconciliation",
)
BACKLOG_TOKENS = Gauge(
    "vllm_stateful_backlog_tokens", "Tokens appended to sessions but not yet ingested"
)
INGEST_LAG = Histogram(
    "vllm_stateful_ingest_lag_seconds",
    "Time from an append to the ingestion of its version",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
EVENT_SUBSCRIBERS = Gauge(
    "vllm_stateful_event_subscribers",
    "Event-stream subscriptions the sessions hold (open and ending sessions)",
)
EVENT_QUEUE_MAX = Gauge(
    "vllm_stateful_event_queue_max",
    "Events waiting in the fullest subscriber queue (a reader this far behind is dropped "
    "at VLLM_STATEFUL_MAX_EVENT_QUEUE)",
)
APPENDS_REJECTED = Counter(
    "vllm_stateful_appends_rejected", "Appends refused because an ingest backlog bound was full"
)


OFFLOADS = Counter("vllm_stateful_offloads", "Sessions whose KV was moved out of the KV pool")
OFFLOAD_RESTORES = Counter(
    "vllm_stateful_offload_restores", "Offloaded sessions brought back into the KV pool for a question"
)
OFFLOADED_SESSIONS = Gauge(
    "vllm_stateful_offloaded_sessions", "Open sessions whose KV is out of the pool (host memory or disk)"
)


def bind(engine: StatefulEngine) -> None:
    """Read the gauges from ``engine`` at scrape time."""
    SESSIONS.set_function(lambda: len(engine.sessions))
    # Ending sessions included: their pins are held until the engine acknowledges CLOSE.
    PINNED_TOKENS.set_function(lambda: sum(s.pinned_tokens for s in engine.registry.budgeted()))
    SESSIONS_ENDING.set_function(lambda: len(engine.registry.ending))
    BUDGET_TOKENS.set(engine.budget.limit_tokens)
    FLASH_QUERIES.set_function(lambda: sum(len(s.flash) for s in engine.sessions.values()))
    BACKLOG_TOKENS.set_function(
        lambda: sum(s.backlog_tokens for s in list(engine.sessions.values()))
    )
    # Ending sessions included: their subscribers are told of the end and
    # only then cleared.
    EVENT_SUBSCRIBERS.set_function(
        lambda: sum(len(s.subscribers) for s in engine.registry.budgeted())
    )
    EVENT_QUEUE_MAX.set_function(
        lambda: max(
            (q.qsize() for s in engine.registry.budgeted() for q in list(s.subscribers)),
            default=0,
        )
    )
    OFFLOADED_SESSIONS.set_function(
        lambda: sum(1 for s in list(engine.sessions.values()) if s.offloaded)
    )
