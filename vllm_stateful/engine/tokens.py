"""Token ids of what users send: session prefixes, appends and questions.

Text is tokenized; token ids are checked against the vocabulary, so a bad id
is refused before it reaches vLLM (``InvalidInputError``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from vllm_stateful.errors import InvalidInputError

Data = str | Sequence[int]


@dataclass
class Tokens:
    tokenizer: Any
    vocab_size: int

    def prefix(self, data: Data) -> list[int]:
        """A session's version 0: text with the tokenizer's special tokens
        (it starts the token log), or token ids, possibly none."""
        if isinstance(data, str):
            return self.tokenizer.encode(data, add_special_tokens=True)
        return self.check_ids(data, allow_empty=True)

    def encode(self, data: Data) -> list[int]:
        """An append or a question: text without special tokens (it
        continues the session's token log), or token ids, at least one."""
        if isinstance(data, str):
            if not data:
                raise InvalidInputError("text must not be empty")
            return self.tokenizer.encode(data, add_special_tokens=False)
        return self.check_ids(data, allow_empty=False)

    def check_ids(self, data: Any, allow_empty: bool) -> list[int]:
        if not isinstance(data, (list, tuple)):
            raise InvalidInputError("expected text (str) or a list of token ids")
        if not data and not allow_empty:
            raise InvalidInputError("token_ids must not be empty")
        for t in data:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise InvalidInputError(
                    f"invalid token id {t!r}: token ids are integers in [0, {self.vocab_size})"
                )
        return list(data)
