"""Sampling fields of completions, chat and flash queries.

The names are ``vllm_stateful.sampling_fields.SAMPLING_FIELDS`` (asserted
below); this module adds their ranges. OpenAI fields that session answers
do not implement are refused by name.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from vllm_stateful.sampling_fields import PASSED_THROUGH, SAMPLING_FIELDS
from vllm_stateful.server.schemas.base import INT64_MAX, Int64, Strict

# Fields of OpenAI's completion / chat bodies that session answers do not
# implement, with the value that means "not used". Anything else is refused
# by name instead of being silently ignored.
_UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "echo": (None, False),
    "suffix": (None, ""),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}


class SamplingFields(Strict):
    """Sampling fields shared by completions, chat and flash queries; they map
    onto ``vllm.SamplingParams`` (see ``server/sampling.py``)."""

    max_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: Int64 | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Int64] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    min_tokens: int = Field(default=0, ge=0, le=INT64_MAX)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name, unused in _UNSUPPORTED.items():
                if name in data and data[name] not in unused:
                    raise ValueError(f"'{name}' is not supported on session requests")
            data = {k: v for k, v in data.items() if k not in _UNSUPPORTED}
        return data

    def sampling_kwargs(self) -> dict[str, Any]:
        """The fields that map one to one onto ``vllm.SamplingParams``
        (``max_tokens`` is resolved by the server against the context)."""
        return {n: getattr(self, n) for n in PASSED_THROUGH if getattr(self, n) is not None}


# The flash cache key compares exactly these fields: one accepted here but
# missing there would let a cache hit answer with other sampling.
assert set(SamplingFields.model_fields) == set(SAMPLING_FIELDS), "see sampling_fields.py"
