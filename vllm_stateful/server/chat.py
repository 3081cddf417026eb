"""Chat messages to the question text a session answers.

The model sees: the session's token log (its prefix with BOS, then every
append), immediately followed by ``messages`` rendered by the chat template
with ``add_generation_prompt=True``. The rendering is tokenized without
special tokens; a BOS string that a template puts first is dropped, because
the session already starts with BOS.
"""

from __future__ import annotations

from typing import Any

from vllm.renderers.hf import safe_apply_chat_template

from vllm_stateful.errors import InvalidInputError
from vllm_stateful.server.schemas import ChatMessage


def render_chat(
    tokenizer: Any,
    model_config: Any,
    chat_template: str | None,
    messages: list[ChatMessage],
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """The text the chat template makes of ``messages`` (see module doc)."""
    conversation = [
        {**(m.model_extra or {}), "role": m.role, "content": m.text()} for m in messages
    ]
    try:
        text = safe_apply_chat_template(
            model_config,
            tokenizer,
            conversation,
            chat_template=chat_template,
            tokenize=False,
            add_generation_prompt=True,
            **(template_kwargs or {}),
        )
    except Exception as exc:  # no template, or the template refused the input
        raise InvalidInputError(f"cannot apply the chat template: {exc}") from exc
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        text = text[len(bos) :]
    if not text:
        raise InvalidInputError("the chat template rendered the messages as empty text")
    return text
