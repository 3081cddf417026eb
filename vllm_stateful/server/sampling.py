"""From an HTTP query body to ``vllm.SamplingParams``.

Precedence follows vLLM's own completion handler: a value in the request,
else the model's generation config (``--generation-config``), else OpenAI's
default. ``max_tokens`` is capped by the context left after the prompt.
Which fields there are, and which a model may default, is the table in
``vllm_stateful/sampling_fields.py``.
"""

from __future__ import annotations

from typing import Any

from vllm import SamplingParams
from vllm.exceptions import VLLMClientError

from vllm_stateful.errors import ContextLengthError, InvalidInputError
from vllm_stateful.sampling_fields import MODEL_DEFAULTABLE
from vllm_stateful.server.schemas import SamplingFields

# OpenAI's default for /v1/completions; chat defaults to the context left.
COMPLETION_MAX_TOKENS = 16


def resolve_max_tokens(
    requested: int | None,
    prompt_len: int,
    max_model_len: int,
    model_default: int | None,
    fallback: int | None,
) -> int:
    """``min(requested or model default or fallback, context left)``."""
    left = max_model_len - prompt_len
    if left <= 0:
        raise ContextLengthError(
            f"the prompt would be {prompt_len} tokens (session context + question); "
            f"the model's context window (max_model_len) is {max_model_len}"
        )
    want = requested if requested is not None else (model_default or fallback)
    return left if want is None else min(want, left)


def build_sampling_params(
    body: SamplingFields, max_tokens: int, model_defaults: dict[str, Any]
) -> SamplingParams:
    kwargs = {
        k: model_defaults[k] for k in MODEL_DEFAULTABLE if model_defaults.get(k) is not None
    }
    kwargs.update(body.sampling_kwargs())
    try:
        return SamplingParams.from_optional(max_tokens=max_tokens, **kwargs)
    except (VLLMClientError, ValueError, TypeError) as exc:  # vLLM's own range checks
        raise InvalidInputError(str(exc)) from exc
