"""Wire format of the session API: request and response bodies.

Shared by the server and the client, so it imports only pydantic (never vLLM
or FastAPI). Response shapes follow OpenAI's completion and chat completion
objects, plus a ``session`` object saying which session version answered.

Request bodies are strict (``extra="forbid"``): a misspelt field is a 400
naming it, not a silently ignored option. OpenAI fields that sessions do not
implement (``n > 1``, ``logprobs``, ``echo``, ...) are refused by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Consistency = Literal["ingested", "latest"]

# Integers the engine receives: vLLM sends requests to its engine core as
# msgpack, which cannot carry integers outside 64 bits (the encoder raises,
# which would be a 500); vLLM's own server bounds ``seed`` the same way.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

# Header that carries a session's access token on every session route.
TOKEN_HEADER = "X-Session-Token"
# Ids a client may choose: letters, digits and ``_ . : @ ~ -``.
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:@~-]+$"


class _Strict(BaseModel):
    # No Infinity/NaN (Python's JSON parser accepts them): an infinite
    # ttl_s made the session's stats unserializable.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _Open(BaseModel):
    # Responses: a newer server may add fields; older clients must still parse.
    model_config = ConfigDict(extra="allow")


# ------------------------------------------------------------------ sessions


class CreateSessionRequest(_Strict):
    """``POST /v1/sessions``. ``prefix`` text is tokenized with the model's
    special tokens (BOS); a list is taken as token ids verbatim."""

    prefix: str | list[int] = ""
    # URL-safe, so that every session can be named in a route's path.
    session_id: str | None = Field(default=None, pattern=SESSION_ID_PATTERN, max_length=256)
    ttl_s: float | None = Field(default=None, gt=0)
    # Flash queries registered with the session, atomically.
    flash: list[FlashRequest] = Field(default_factory=list)


class CreateSessionResponse(_Open):
    id: str
    token: str  # send as X-Session-Token on every route of this session
    tokens: int
    version: int


class SessionStats(_Open):
    """``GET /v1/sessions/{id}``: the engine's view of one session."""

    object: Literal["session"] = "session"
    id: str
    tokens: int
    version: int
    ingested_version: int
    pending: int  # versions appended but not yet ingested
    pinned_tokens: int
    ingest_requests: int
    created_at: float  # unix time
    expires_at: float | None  # unix time; None: no TTL
    state: str = "active"  # creating | active (only open sessions are listed)
    ingested_tokens: int = 0  # tokens pinned (ingestion chunk ends included)
    backlog_tokens: int = 0  # appended but not yet ingested
    ingest_lag_s: float = 0.0  # age of the oldest un-ingested append; 0.0 when caught up
    ingest_rate_tps: float | None = None  # prompt tokens/s ingested, smoothed; None: not yet measured
    tenant: str = "default"  # from the tenant header at create (config tenant_header)


class SessionList(_Open):
    object: Literal["list"] = "list"
    data: list[SessionStats]


class AppendRequest(_Strict):
    """``POST /v1/sessions/{id}/append``: exactly one of ``text`` (tokenized
    without special tokens) or ``token_ids``."""

    text: str | None = None
    token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _one_of(self) -> AppendRequest:
        if (self.text is None) == (self.token_ids is None):
            raise ValueError("give exactly one of 'text' or 'token_ids'")
        return self

    @property
    def data(self) -> str | list[int]:
        return self.text if self.text is not None else list(self.token_ids or [])


class AppendResponse(_Open):
    version: int
    # Set when the request asked ``?wait=true``: the version now ingested.
    ingested_version: int | None = None


class CloseResponse(_Open):
    id: str
    object: Literal["session.deleted"] = "session.deleted"
    deleted: bool = True


class SessionEvent(_Open):
    """One server-sent event of ``GET /v1/sessions/{id}/events``."""

    type: str  # "ingested" | "flash" | "closed" | "evicted"
    session_id: str
    version: int
    data: dict[str, Any] = Field(default_factory=dict)


# ------------------------------------------------------------- completions


class StreamOptions(_Strict):
    include_usage: bool = False


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


class SamplingFields(_Strict):
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
        names = (
            "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids",
            "presence_penalty", "frequency_penalty", "repetition_penalty", "min_tokens",
            "ignore_eos", "skip_special_tokens", "include_stop_str_in_output",
        )  # fmt: skip
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


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


class TextPart(_Strict):
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


# ------------------------------------------------------------------- flash


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


class FlashAnswer(_Open):
    version: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    confidence: float  # geometric-mean probability of the answer's tokens
    computed_at: float  # unix time


class FlashInfo(_Open):
    id: str
    object: Literal["session.flash"] = "session.flash"
    prompt: str | list[int]
    max_tokens: int
    temperature: float
    seed: int | None = None
    only_changed: bool = False
    max_staleness_ms: float | None = None  # default bound for stale hits
    latest: FlashAnswer | None = None  # the newest cached answer


class FlashList(_Open):
    object: Literal["list"] = "list"
    data: list[FlashInfo]


class FlashDeleted(_Open):
    id: str
    object: Literal["session.flash.deleted"] = "session.flash.deleted"
    deleted: bool = True


class SessionInfo(_Open):
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


class PromptTokensDetails(_Open):
    cached_tokens: int = 0


class Usage(_Open):
    prompt_tokens: int  # session context + question
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(_Open):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class Completion(_Open):
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


class ChatMessageOut(_Open):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Open):
    index: int = 0
    message: ChatMessageOut
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletion(_Open):
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


class ChatDelta(_Open):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Open):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_Open):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None


class CompletionChunk(_Open):
    """One ``data:`` line of a streamed completion; ``text`` is a delta."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    session: SessionInfo | None = None


# ------------------------------------------------------------------- errors


class ErrorInfo(_Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(_Open):
    error: ErrorInfo


# Defined before the flash models it names.
CreateSessionRequest.model_rebuild()
