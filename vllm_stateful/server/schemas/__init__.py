"""Wire format of the session API: request and response bodies.

Shared by the server and the client, so it imports only pydantic (never vLLM
or FastAPI). Response shapes follow OpenAI's completion and chat completion
objects, plus a ``session`` object saying which session version answered.

Request bodies are strict (``extra="forbid"``): a misspelt field is a 400
naming it, not a silently ignored option. OpenAI fields that sessions do not
implement (``n > 1``, ``logprobs``, ``echo``, ...) are refused by name.

``base`` holds what every body shares, ``sampling`` the sampling fields,
``sessions``, ``completions`` and ``flash`` the bodies of their routes; every
name is importable from here.
"""

from vllm_stateful.server.schemas.base import (
    INT64_MAX,
    INT64_MIN,
    SESSION_ID_PATTERN,
    TOKEN_HEADER,
    Consistency,
    ErrorInfo,
    ErrorResponse,
    Int64,
)
from vllm_stateful.server.schemas.completions import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    ChatMessageOut,
    Completion,
    CompletionChoice,
    CompletionChunk,
    PromptTokensDetails,
    SessionChatRequest,
    SessionCompletionRequest,
    SessionInfo,
    SessionQuery,
    StreamOptions,
    TextPart,
    Usage,
)
from vllm_stateful.server.schemas.flash import (
    FlashAnswer,
    FlashDeleted,
    FlashInfo,
    FlashList,
    FlashRequest,
)
from vllm_stateful.server.schemas.sampling import SamplingFields
from vllm_stateful.server.schemas.sessions import (
    AppendRequest,
    AppendResponse,
    CloseResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    SessionEvent,
    SessionList,
    SessionStats,
)

__all__ = [
    "INT64_MAX",
    "INT64_MIN",
    "SESSION_ID_PATTERN",
    "TOKEN_HEADER",
    "AppendRequest",
    "AppendResponse",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletion",
    "ChatCompletionChunk",
    "ChatDelta",
    "ChatMessage",
    "ChatMessageOut",
    "CloseResponse",
    "Completion",
    "CompletionChoice",
    "CompletionChunk",
    "Consistency",
    "CreateSessionRequest",
    "CreateSessionResponse",
    "ErrorInfo",
    "ErrorResponse",
    "FlashAnswer",
    "FlashDeleted",
    "FlashInfo",
    "FlashList",
    "FlashRequest",
    "Int64",
    "PromptTokensDetails",
    "SamplingFields",
    "SessionChatRequest",
    "SessionCompletionRequest",
    "SessionEvent",
    "SessionInfo",
    "SessionList",
    "SessionQuery",
    "SessionStats",
    "StreamOptions",
    "TextPart",
    "Usage",
]
