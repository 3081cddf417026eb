"""The sampling fields of session and flash queries: one table.

Every name is a ``vllm.SamplingParams`` attribute and a field of the HTTP
request bodies (``server/schemas``). Three places read this table: the
bodies' fields are checked against it, ``server/sampling.py`` maps a body
onto ``SamplingParams`` with it, and the flash cache key
(``engine/flash.py``) compares all of it, so a field the server accepts can
never be left out of the key. Imports nothing: the client loads the schemas
without vLLM.
"""

from __future__ import annotations

# Copied from a request body onto ``SamplingParams`` as given, when set.
PASSED_THROUGH: tuple[str, ...] = (
    "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
    "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
)  # fmt: skip

# Every field a body carries: ``max_tokens`` too, which the server resolves
# against the context left instead of copying it. These settings decide an
# answer, so they are the flash cache key: a query hits a flash query's cache
# only if all of them are equal.
SAMPLING_FIELDS: tuple[str, ...] = ("max_tokens", *PASSED_THROUGH)

# Fields the model's generation config (``generation_config.json``) may set
# when a request leaves them unset, as in vLLM's own completion handler.
MODEL_DEFAULTABLE: tuple[str, ...] = (
    "temperature", "top_p", "top_k", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty",
)  # fmt: skip

assert set(MODEL_DEFAULTABLE) <= set(PASSED_THROUGH)
