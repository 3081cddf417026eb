"""Flash query bodies: registering one, and the cached answers it keeps."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from vllm_stateful.server.schemas.base import SESSION_ID_PATTERN, Open
from vllm_stateful.server.schemas.sampling import SamplingFields


class FlashRequest(SamplingFields):
    """A flash query: ``prompt`` is re-answered after every ingested version.
    Sampling must be deterministic: temperature 0 (the default here) or a
    seed. A session query with the same prompt and sampling fields is
    answered from its cache."""

    prompt: str | list[int]
    id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN, max_length=128)
    # Push a ``flash`` event only when the answer's text changed.
    only_changed: bool = False
    temperature: float | None = Field(default=0.0, ge=0)
    # Default staleness bound for queries answered from this flash query.
    max_staleness_ms: float | None = Field(default=None, ge=0)

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


class FlashAnswer(Open):
    version: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    confidence: float  # geometric-mean probability of the answer's tokens
    computed_at: float  # unix time


class FlashInfo(Open):
    id: str
    object: Literal["session.flash"] = "session.flash"
    prompt: str | list[int]
    max_tokens: int
    temperature: float
    seed: int | None = None
    only_changed: bool = False
    max_staleness_ms: float | None = None  # default bound for stale hits
    latest: FlashAnswer | None = None  # the newest cached answer


class FlashList(Open):
    object: Literal["list"] = "list"
    data: list[FlashInfo]


class FlashDeleted(Open):
    id: str
    object: Literal["session.flash.deleted"] = "session.flash.deleted"
    deleted: bool = True
