"""What a flash query is, what its cached answer is, and the rules a cached
answer must meet to be served: deterministic sampling, the asker's sampling
settings equal to the query's, and bounded staleness (``staleness_ms``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from vllm import SamplingParams

from vllm_stateful.errors import InvalidInputError
from vllm_stateful.sampling_fields import SAMPLING_FIELDS

if TYPE_CHECKING:
    from vllm_stateful.engine.session import Session


def params_key(params: SamplingParams) -> tuple:
    """The sampling settings that decide an answer (``SAMPLING_FIELDS``, the
    fields the server accepts): a query hits a flash query's cache only if
    all of them are equal."""
    return tuple(
        tuple(v) if isinstance(v, list) else v
        for v in (getattr(params, name) for name in SAMPLING_FIELDS)
    )


def check_cacheable(params: SamplingParams) -> None:
    """A cached answer must be the answer: sampling needs a seed."""
    if params.temperature > 0 and params.seed is None:
        raise InvalidInputError(
            "flash queries need deterministic sampling: use temperature 0 "
            "(greedy) or set a seed"
        )
    if params.n != 1:
        raise InvalidInputError("flash queries produce one answer (n must be 1)")


def check_staleness(max_staleness_ms: Any) -> float | None:
    if max_staleness_ms is None:
        return None
    if isinstance(max_staleness_ms, bool) or not isinstance(max_staleness_ms, (int, float)) or not (
        max_staleness_ms >= 0
    ):
        raise InvalidInputError(
            f"max_staleness_ms must be a number >= 0, got {max_staleness_ms!r}"
        )
    return float(max_staleness_ms)


def staleness_ms(session: Session, version: int, now: float) -> float | None:
    """0 for the newest ingested version; else ms since the version that
    superseded ``version`` (the next one ingested) was ingested. None when
    ``version`` is older than the session's bounded history."""
    if version == session.ingested_version:
        return 0.0
    history = list(session.ingested_history)
    for (v, _), (_, superseded_at) in zip(history, history[1:]):
        if v == version:
            return (now - superseded_at) * 1e3
    return None


def confidence(token_ids: list[int], logprobs: Any) -> float:
    """Geometric-mean probability of the answer's tokens, in [0, 1]: 1.0
    when the model was certain of every token it produced."""
    if not token_ids or not logprobs:
        return 0.0
    total = sum(step[tok].logprob for tok, step in zip(token_ids, logprobs))
    return math.exp(total / len(token_ids))


@dataclass(frozen=True)
class FlashQuery:
    id: str
    prompt: str | list[int]  # as registered
    token_ids: list[int]  # the question's tokens
    params: SamplingParams
    only_changed: bool = False  # push only answers that differ from the last
    # Default bound for serving this query's answer after a newer version
    # is ingested (a query's own max_staleness_ms overrides it).
    max_staleness_ms: float | None = None


@dataclass(frozen=True)
class FlashResult:
    flash_id: str
    version: int
    text: str
    token_ids: list[int]
    finish_reason: str | None
    confidence: float
    computed_at: float  # wall clock, seconds
    changed: bool  # text differs from the previous version's answer
