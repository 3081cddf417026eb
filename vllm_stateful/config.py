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
    # Flash queries: caps per session and over all sessions, and how many
    # evaluations may run together in idle time.
    max_flash_per_session: int = 16
    max_flash_total: int = 256
    flash_concurrency: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.budget_fraction < 1.0:
            raise ValueError(f"budget_fraction must be in (0, 1), got {self.budget_fraction}")

    @classmethod
    def from_env(cls) -> StatefulConfig:
        """``VLLM_STATEFUL_BUDGET_FRACTION``, ``VLLM_STATEFUL_BUDGET_TOKENS``,
        ``VLLM_STATEFUL_TTL_S``, ``VLLM_STATEFUL_MAX_SESSIONS``."""
        cfg = cls()
        if (v := _env_float("VLLM_STATEFUL_BUDGET_FRACTION")) is not None:
            cfg.budget_fraction = v
        if (v := _env_float("VLLM_STATEFUL_BUDGET_TOKENS")) is not None:
            cfg.budget_tokens = int(v)
        if (v := _env_float("VLLM_STATEFUL_TTL_S")) is not None:
            cfg.default_ttl_s = v
        if (v := _env_float("VLLM_STATEFUL_MAX_SESSIONS")) is not None:
            cfg.max_sessions = int(v)
        cfg.__post_init__()
        return cfg


def connector_config() -> dict:
    """The ``kv_transfer_config`` that loads the session connector."""
    return {
        "kv_connector": "StatefulConnector",
        "kv_connector_module_path": "vllm_stateful.kv.connector",
        "kv_role": "kv_both",
    }
