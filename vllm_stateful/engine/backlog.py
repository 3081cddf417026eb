"""Backlog bounds: how many appended-but-not-ingested tokens one session and
the whole server may hold.

A live stream that appends faster than the engine ingests would otherwise
queue without limit (memory grows, lag grows, questions with
``consistency="latest"`` wait longer and longer). Past a bound an append is
refused up front with a typed error and a retry estimate from the measured
ingest rate; nothing is appended, so nothing acknowledged is ever dropped.
"""

from __future__ import annotations

from typing import Iterable

from vllm_stateful import metrics
from vllm_stateful.config import StatefulConfig
from vllm_stateful.engine.session import Session
from vllm_stateful.errors import BacklogFullError, InvalidInputError

# Retry estimate before any ingest request has been measured.
DEFAULT_RETRY_S = 1.0


def retry_after_s(excess_tokens: int, rate_tps: float | None) -> float:
    """Seconds until ``excess_tokens`` more are ingested at ``rate_tps``."""
    if not rate_tps or rate_tps <= 0:
        return DEFAULT_RETRY_S
    return excess_tokens / rate_tps


def _rate(rate_tps: float | None) -> str:
    return "not measured yet" if rate_tps is None else f"{rate_tps:.0f} tokens/s"


def check_backlog(
    config: StatefulConfig,
    session: Session,
    sessions: Iterable[Session],
    num_tokens: int,
    server_rate_tps: float | None,
) -> None:
    """May ``session`` take an append of ``num_tokens``? Raises if not."""
    for name, bound, env in (
        ("max_backlog_tokens", config.max_backlog_tokens, "VLLM_STATEFUL_MAX_BACKLOG_TOKENS"),
        ("max_backlog_tokens_total", config.max_backlog_tokens_total,
         "VLLM_STATEFUL_MAX_BACKLOG_TOKENS_TOTAL"),
    ):  # fmt: skip
        if num_tokens > bound:
            # Waiting would never help: say so instead of asking for retries.
            raise InvalidInputError(
                f"an append of {num_tokens} tokens is larger than {name}={bound} ({env}); "
                f"split it into smaller appends"
            )
    own = session.backlog_tokens
    if own + num_tokens > config.max_backlog_tokens:
        rate = session.ingest_rate_tps or server_rate_tps
        _refuse(
            f"session '{session.id}' has {own} tokens appended but not ingested",
            "max_backlog_tokens", config.max_backlog_tokens, num_tokens,
            retry_after_s(own + num_tokens - config.max_backlog_tokens, rate), rate,
        )  # fmt: skip
    sessions = list(sessions)
    total = sum(s.backlog_tokens for s in sessions)
    if total + num_tokens > config.max_backlog_tokens_total:
        # Sessions with a backlog ingest concurrently: their rates add up.
        rates = [s.ingest_rate_tps for s in sessions if s.backlog_tokens and s.ingest_rate_tps]
        rate = sum(rates) if rates else server_rate_tps
        _refuse(
            f"sessions on this server have {total} tokens appended but not ingested",
            "max_backlog_tokens_total", config.max_backlog_tokens_total, num_tokens,
            retry_after_s(total + num_tokens - config.max_backlog_tokens_total, rate), rate,
        )  # fmt: skip


def _refuse(
    state: str, name: str, bound: int, num_tokens: int, retry_s: float, rate: float | None
) -> None:
    metrics.APPENDS_REJECTED.inc()
    raise BacklogFullError(
        f"ingest backlog full: {state}; an append of {num_tokens} tokens would pass "
        f"{name}={bound}; ingest rate {_rate(rate)}; retry in {retry_s:.1f} s",
        retry_after_s=retry_s,
    )
