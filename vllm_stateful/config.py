"""One configuration object; environment variables are read here only."""

from __future__ import annotations

import os
from dataclasses import dataclass


def _env_float(name: str) -> float | None:
    raw = os.environ.get(name)
    return None if raw in (None, "") else float(raw)


@dataclass
class StatefulConfig:
    # Share of the KV cache that sessions may pin together. The rest always
    # stays free for the requests that run, so pinned sessions can never
    # starve the engine (the deadlock of unbudgeted pinning).
    budget_fraction: float = 0.5
    # Absolute cap in KV tokens; overrides ``budget_fraction`` when set.
    budget_tokens: int | None = None
    # Idle time after which a session is closed; None keeps it until closed.
    default_ttl_s: float | None = None
    max_sessions: int = 1024
    # Events a subscriber may leave unread before it is dropped (it gets a
    # final "dropped" event): a slow reader cannot grow memory without limit.
    max_event_queue: int = 1024
    # Flash queries: caps per session and over all sessions, and how many
    # evaluations may run together in idle time.
    max_flash_per_session: int = 16
    max_flash_total: int = 256
    flash_concurrency: int = 4
    # With the engine-side scheduler, one flash query per session rides the
    # ingestion request of each version instead of an evaluation request of
    # its own (engine/flash_ride.py).
    flash_with_ingest: bool = True
    # Ingestion sends at most this many new tokens per engine request; each
    # finished chunk is pinned (progress survives a later failure). How long
    # a question waits is bounded per step by the engine-side scheduler, not
    # by this; smaller chunks cost throughput (each request pays its own
    # tail copy, prefix lookup and a step boundary: a 1,024-token burst went
    # at 873 tokens/s in 256-token chunks and 945 in one, SmolLM2 float32,
    # one run each on 2 cores).
    ingest_chunk_tokens: int = 1024
    # Appended-but-not-ingested tokens allowed per session and over all
    # sessions; past either bound an append is refused (429), not queued
    # without limit.
    max_backlog_tokens: int = 8192
    max_backlog_tokens_total: int = 65536
    # Tenants: the HTTP header whose value names a session's tenant (no
    # header: tenant "default"), and per-tenant caps on open sessions and on
    # pinned (budgeted) KV tokens, so one client cannot take the whole
    # budget. None: no cap.
    tenant_header: str = "X-Tenant"
    tenant_max_sessions: int | None = None
    tenant_max_tokens: int | None = None
    # The durable session log (``store/``): a file path, "off", or None for
    # the default (the server keeps one file per model and port under the
    # user's state directory; the Python API keeps none). ``store_sync``:
    # "group" (durable before acknowledged, concurrent appends share one
    # fsync), "each" (one fsync per append) or "os" (written to the OS
    # without fsync: survives a crash of the server, not of the machine).
    store: str | None = None
    store_sync: str = "group"
    # Offload (engine/residency.py): idle sessions, and the least recently
    # used ones when the budget is full, move their KV out of the pool
    # (host memory, then disk: VLLM_STATEFUL_OFFLOAD_DIR) and come back on
    # use. ``offload_idle_s``: idle time before a session moves out (None:
    # only under pressure).
    offload: bool = True
    offload_idle_s: float | None = 300.0

    def __post_init__(self) -> None:
        if not 0.0 < self.budget_fraction < 1.0:
            raise ValueError(f"budget_fraction must be in (0, 1), got {self.budget_fraction}")
        if self.max_event_queue < 1:
            raise ValueError(f"max_event_queue must be at least 1, got {self.max_event_queue}")
        for name in ("ingest_chunk_tokens", "max_backlog_tokens", "max_backlog_tokens_total"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("tenant_max_sessions", "tenant_max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.tenant_header.strip():
            raise ValueError("tenant_header must not be empty")
        from vllm_stateful.store import SYNC_MODES

        if self.store_sync not in SYNC_MODES:
            raise ValueError(f"store_sync must be one of {SYNC_MODES}, got {self.store_sync!r}")

    @classmethod
    def from_env(cls) -> StatefulConfig:
        """``VLLM_STATEFUL_BUDGET_FRACTION``, ``VLLM_STATEFUL_BUDGET_TOKENS``,
        ``VLLM_STATEFUL_TTL_S``, ``VLLM_STATEFUL_MAX_SESSIONS``,
        ``VLLM_STATEFUL_MAX_EVENT_QUEUE``,
        ``VLLM_STATEFUL_INGEST_CHUNK_TOKENS``, ``VLLM_STATEFUL_MAX_BACKLOG_TOKENS``,
        ``VLLM_STATEFUL_MAX_BACKLOG_TOKENS_TOTAL``, ``VLLM_STATEFUL_TENANT_HEADER``,
        ``VLLM_STATEFUL_TENANT_MAX_SESSIONS``, ``VLLM_STATEFUL_TENANT_MAX_TOKENS``,
        ``VLLM_STATEFUL_STORE``, ``VLLM_STATEFUL_STORE_SYNC``, ``VLLM_STATEFUL_OFFLOAD``,
        ``VLLM_STATEFUL_OFFLOAD_IDLE_S``, ``VLLM_STATEFUL_FLASH_WITH_INGEST``."""
        cfg = cls()
        if store := os.environ.get("VLLM_STATEFUL_STORE", "").strip():
            cfg.store = store
        if sync := os.environ.get("VLLM_STATEFUL_STORE_SYNC", "").strip().lower():
            cfg.store_sync = sync
        if os.environ.get("VLLM_STATEFUL_FLASH_WITH_INGEST", "").strip().lower() in ("0", "off", "false"):
            cfg.flash_with_ingest = False
        if (raw := os.environ.get("VLLM_STATEFUL_OFFLOAD", "").strip().lower()) in ("0", "off", "false"):
            cfg.offload = False
        if (raw := os.environ.get("VLLM_STATEFUL_OFFLOAD_IDLE_S", "").strip().lower()):
            cfg.offload_idle_s = None if raw in ("off", "none") else float(raw)
        if header := os.environ.get("VLLM_STATEFUL_TENANT_HEADER", "").strip():
            cfg.tenant_header = header
        if (v := _env_float("VLLM_STATEFUL_TENANT_MAX_SESSIONS")) is not None:
            cfg.tenant_max_sessions = int(v)
        if (v := _env_float("VLLM_STATEFUL_TENANT_MAX_TOKENS")) is not None:
            cfg.tenant_max_tokens = int(v)
        if (v := _env_float("VLLM_STATEFUL_BUDGET_FRACTION")) is not None:
            cfg.budget_fraction = v
        if (v := _env_float("VLLM_STATEFUL_BUDGET_TOKENS")) is not None:
            cfg.budget_tokens = int(v)
        if (v := _env_float("VLLM_STATEFUL_TTL_S")) is not None:
            cfg.default_ttl_s = v
        if (v := _env_float("VLLM_STATEFUL_MAX_SESSIONS")) is not None:
            cfg.max_sessions = int(v)
        if (v := _env_float("VLLM_STATEFUL_MAX_EVENT_QUEUE")) is not None:
            cfg.max_event_queue = int(v)
        if (v := _env_float("VLLM_STATEFUL_INGEST_CHUNK_TOKENS")) is not None:
            cfg.ingest_chunk_tokens = int(v)
        if (v := _env_float("VLLM_STATEFUL_MAX_BACKLOG_TOKENS")) is not None:
            cfg.max_backlog_tokens = int(v)
        if (v := _env_float("VLLM_STATEFUL_MAX_BACKLOG_TOKENS_TOTAL")) is not None:
            cfg.max_backlog_tokens_total = int(v)
        cfg.__post_init__()
        return cfg


@dataclass
class SchedulingConfig:
    """Engine-side request classes (``kv/scheduler.py``, ``kv/pacing.py``);
    read in the engine-core process."""

    # While a question runs, a step may carry ingestion up to this fraction
    # of a pure decode step's time on top of it.
    foreground_slack: float = 0.1
    # With no question running, a step may take this many decode steps' time
    # on top of one: the longest a question arriving now waits for the step
    # in flight. Small while questions come (within ``active_window_s`` of
    # the last one), large after a quiet spell (a feed alone at full speed).
    active_step_factor: float = 1.5
    idle_step_factor: float = 12.0
    active_window_s: float = 10.0
    # The ingestion lag (age of the oldest acknowledged, un-ingested data in
    # the engine) past which ingestion takes flash evaluations' steps and,
    # while questions come, its steps grow in proportion, up to twice.
    ingest_lag_target_s: float = 1.0
    # Ingestion tokens a step may always carry, whatever the measurements
    # (so ingestion never stops entirely). Small: on CPU one prompt token
    # costs several percent of a decode step.
    min_ingest_tokens: int = 4
    # A request passed over this many steps in a row goes first once.
    starve_steps: int = 8

    @classmethod
    def from_env(cls) -> SchedulingConfig:
        """``VLLM_STATEFUL_FOREGROUND_SLACK``, ``VLLM_STATEFUL_IDLE_STEP_FACTOR``,
        ``VLLM_STATEFUL_ACTIVE_STEP_FACTOR``, ``VLLM_STATEFUL_ACTIVE_WINDOW_S``,
        ``VLLM_STATEFUL_INGEST_LAG_TARGET_S``,
        ``VLLM_STATEFUL_MIN_INGEST_TOKENS``, ``VLLM_STATEFUL_STARVE_STEPS``."""
        cfg = cls()
        if (v := _env_float("VLLM_STATEFUL_FOREGROUND_SLACK")) is not None:
            cfg.foreground_slack = v
        if (v := _env_float("VLLM_STATEFUL_IDLE_STEP_FACTOR")) is not None:
            cfg.idle_step_factor = v
        if (v := _env_float("VLLM_STATEFUL_ACTIVE_STEP_FACTOR")) is not None:
            cfg.active_step_factor = v
        if (v := _env_float("VLLM_STATEFUL_ACTIVE_WINDOW_S")) is not None:
            cfg.active_window_s = v
        if (v := _env_float("VLLM_STATEFUL_INGEST_LAG_TARGET_S")) is not None:
            cfg.ingest_lag_target_s = max(v, 1e-3)
        if (v := _env_float("VLLM_STATEFUL_MIN_INGEST_TOKENS")) is not None:
            cfg.min_ingest_tokens = max(1, int(v))
        if (v := _env_float("VLLM_STATEFUL_STARVE_STEPS")) is not None:
            cfg.starve_steps = max(1, int(v))
        return cfg


def scheduler_cls() -> str:
    """The ``--scheduler-cls`` that gives session traffic its request classes."""
    return "vllm_stateful.kv.scheduler.StatefulScheduler"


def connector_config() -> dict:
    """The ``kv_transfer_config`` that loads the session connector."""
    return {
        "kv_connector": "StatefulConnector",
        "kv_connector_module_path": "vllm_stateful.kv.connector",
        "kv_role": "kv_both",
    }


# Speculative decoding of answers (vLLM's proposers; README "Speculative
# decoding"). Answers about a stream copy from it (prices, times, sizes),
# which prompt lookup (n-gram) drafts for free; a draft costs a verification
# slot in the step whether accepted or not, which is cheap while a step reads
# the weights for one or two sequences and not when the batch is full. So the
# drafts per step shrink with the batch (vLLM's
# ``num_speculative_tokens_per_batch_size``, counted over the requests
# scheduled in the step) and stop at 9 and more.
SPECULATION_ENV = "VLLM_STATEFUL_SPECULATION"
SPECULATION_METHODS = ("off", "ngram", "suffix")
# On: benchmarks/speculation.py (README "Speculative decoding") measured
# copy-heavy answers 1.70x faster per token at 1 session and 1.34x at 16, and
# others within 5% of off at 16 sessions. vLLM refuses ``min_p`` and
# ``logit_bias`` with speculation on; ``off`` serves them.
DEFAULT_SPECULATION = "ngram"
SPECULATIVE_TOKENS = 4
SPECULATION_SCHEDULE = ((1, 1, 4), (2, 4, 2), (5, 8, 1), (9, 1 << 20, 0))


def speculation_method() -> str:
    """``VLLM_STATEFUL_SPECULATION``: ``off``, ``ngram`` or ``suffix``
    (default ``DEFAULT_SPECULATION``)."""
    raw = os.environ.get(SPECULATION_ENV, "").strip().lower() or DEFAULT_SPECULATION
    if raw not in SPECULATION_METHODS:
        raise ValueError(
            f"{SPECULATION_ENV}={raw!r}: expected one of {', '.join(SPECULATION_METHODS)}"
        )
    return raw


def speculative_config(method: str | None = None) -> dict | None:
    """vLLM's ``speculative_config`` for ``method`` (default: the setting),
    with the batch-size schedule; None when off. A user's own
    ``--speculative-config`` is never replaced by this."""
    method = speculation_method() if method is None else method
    if method == "off":
        return None
    schedule = [list(entry) for entry in SPECULATION_SCHEDULE]
    if method == "ngram":
        return {
            "method": "ngram",
            "num_speculative_tokens": SPECULATIVE_TOKENS,
            "prompt_lookup_min": 2,
            "prompt_lookup_max": 5,
            "num_speculative_tokens_per_batch_size": schedule,
        }
    if method == "suffix":
        import importlib.util

        if importlib.util.find_spec("arctic_inference") is None:
            raise ValueError(
                f"{SPECULATION_ENV}=suffix needs the package arctic-inference (vLLM's suffix "
                "proposer; published as a source build); install it or use ngram"
            )
        return {
            "method": "suffix",
            "num_speculative_tokens": SPECULATIVE_TOKENS,
            "num_speculative_tokens_per_batch_size": schedule,
        }
    raise ValueError(f"unknown speculation method {method!r}")
