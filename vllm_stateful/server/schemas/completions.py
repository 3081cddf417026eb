"""Completion and chat bodies of session queries, and the OpenAI objects
that answer them, whole or streamed, each with a ``session`` object saying
which session version answered."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from vllm_stateful.server.schemas.base import INT64_MAX, Consistency, Open, Strict
from vllm_stateful.server.schemas.sampling import SamplingFields


class StreamOptions(Strict):
    include_usage: bool = False


class SessionQuery(SamplingFields):
    """Sampling and session fields shared by completions and chat."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extension: also return the generated token ids.
    return_token_ids: bool = False
    # Session fields.
    session_id: str | None = None  # on /v1/completions and /v1/chat/completions
    consistency: Consistency = "ingested"
    commit: bool = False
    # Serve a flash query's cached answer on an older version if the version
    # that superseded it was ingested at most this long ago (default: the
    # flash query's own bound; none: the newest ingested version only).
    max_staleness_ms: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _check_commit(self) -> SessionQuery:
        # Committing appends question + answer; with a stream the answer is
        # already on the wire when the append could still be refused.
        if self.commit and self.stream:
            raise ValueError("'commit' cannot be combined with 'stream'")
        return self


class SessionCompletionRequest(SessionQuery):
    """``POST /v1/sessions/{id}/completions`` (and ``/v1/completions`` with
    ``session_id``): ``prompt`` is the question asked after the session's
    context; text is tokenized without special tokens."""

    prompt: str | list[int]

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, v: str | list[int]) -> str | list[int]:
        if len(v) == 0:
            raise ValueError("prompt must not be empty")
        return v


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra keys (name, tool_call_id, ...) are passed to the chat template.
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class SessionChatRequest(SessionQuery):
    """``POST /v1/chat/completions`` with ``session_id``: ``messages`` are
    rendered with the model's chat template (``add_generation_prompt``) and
    the text is asked after the session's context."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT64_MAX)
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _max_tokens_alias(self) -> SessionChatRequest:
        # OpenAI renamed max_tokens to max_completion_tokens for chat.
        if self.max_completion_tokens is not None:
            if self.max_tokens is not None and self.max_tokens != self.max_completion_tokens:
                raise ValueError("give 'max_tokens' or 'max_completion_tokens', not both")
            self.max_tokens = self.max_completion_tokens
        return self


# ------------------------------------------------------------------ answers


class SessionInfo(Open):
    """Which session state answered a query."""

    id: str
    version: int  # the session version the answer saw
    flash: bool = False  # answered from a flash query's cache
    computed_at: float | None = None  # unix time a flash answer was computed
    # 0 on the newest ingested version; else ms since the version that
    # superseded the answer's was ingested (a bounded-staleness flash hit).
    staleness_ms: float = 0.0
    computed_tokens: int  # prompt tokens the engine computed for this answer
    committed_version: int | None = None  # set when ``commit`` appended q+a


class PromptTokensDetails(Open):
    cached_tokens: int = 0


class Usage(Open):
    prompt_tokens: int  # session context + question
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(Open):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class Completion(Open):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session: SessionInfo

    @property
    def text(self) -> str:
        return self.choices[0].text


class ChatMessageOut(Open):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(Open):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletion(Open):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    session: SessionInfo

    @property
    def text(self) -> str:
        return self.choices[0].message.content


class ChatDelta(Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(Open):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None


class CompletionChunk(Open):
    """One ``data:`` line of a streamed completion; ``text`` is a delta."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None
