"""OpenAI completion / chat completion objects built from session answers.

``usage.prompt_tokens`` counts the whole prompt the model attended to
(session context + question), as a stateless request would report it;
``usage.prompt_tokens_details.cached_tokens`` is the part served from the
session's KV, and ``session.computed_tokens`` the part computed for this
answer (the question, when the session is pinned).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field

from vllm_stateful.server.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionChunk,
    PromptTokensDetails,
    SessionInfo,
    Usage,
)


def usage(prompt_tokens: int, completion_tokens: int, computed_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=prompt_tokens - computed_tokens),
    )


def completion(model: str, session: SessionInfo, result, with_token_ids: bool) -> Completion:
    """From an engine ``QueryResult``."""
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[
            CompletionChoice(
                text=result.text,
                finish_reason=result.finish_reason,
                token_ids=list(result.token_ids) if with_token_ids else None,
            )
        ],
        usage=usage(result.prompt_tokens, len(result.token_ids), result.computed_tokens),
        session=session,
    )


def chat_completion(
    model: str, session: SessionInfo, result, with_token_ids: bool
) -> ChatCompletion:
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=[
            ChatChoice(
                message=ChatMessageOut(content=result.text),
                finish_reason=result.finish_reason,
                token_ids=list(result.token_ids) if with_token_ids else None,
            )
        ],
        usage=usage(result.prompt_tokens, len(result.token_ids), result.computed_tokens),
        session=session,
    )


@dataclass
class ChunkWriter:
    """Turns engine ``QueryResult`` deltas into OpenAI stream chunks.

    One id and timestamp for the whole stream; counts tokens for the usage
    chunk that ``stream_options.include_usage`` asks for.
    """

    model: str
    session_id: str
    chat: bool
    with_token_ids: bool
    id: str = field(default="")
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    prompt_tokens: int = 0
    computed_tokens: int = 0
    _first: bool = True

    def __post_init__(self) -> None:
        self.id = self.id or f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def chunk(self, q) -> CompletionChunk | ChatCompletionChunk:
        self.completion_tokens += len(q.token_ids)
        self.prompt_tokens, self.computed_tokens = q.prompt_tokens, q.computed_tokens
        session = SessionInfo(
            id=self.session_id, version=q.version, computed_tokens=q.computed_tokens,
            flash=q.flash, computed_at=q.computed_at, staleness_ms=q.staleness_ms,
        )  # fmt: skip
        token_ids = list(q.token_ids) if self.with_token_ids else None
        first, self._first = self._first, False
        if self.chat:
            delta = ChatDelta(role="assistant" if first else None, content=q.text)
            return ChatCompletionChunk(
                id=self.id, created=self.created, model=self.model, session=session,
                choices=[ChatChunkChoice(delta=delta, finish_reason=q.finish_reason, token_ids=token_ids)],
            )  # fmt: skip
        return CompletionChunk(
            id=self.id, created=self.created, model=self.model, session=session,
            choices=[CompletionChoice(text=q.text, finish_reason=q.finish_reason, token_ids=token_ids)],
        )  # fmt: skip

    def usage_chunk(self) -> CompletionChunk | ChatCompletionChunk:
        """OpenAI's closing chunk for ``include_usage``: no choices, usage."""
        u = usage(self.prompt_tokens, self.completion_tokens, self.computed_tokens)
        cls = ChatCompletionChunk if self.chat else CompletionChunk
        return cls(id=self.id, created=self.created, model=self.model, choices=[], usage=u)
