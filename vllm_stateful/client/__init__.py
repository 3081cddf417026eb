"""HTTP client of the vllm-stateful session API, sync and async.

    from vllm_stateful.client import Client

    with Client("http://localhost:8000", api_key="...") as client:
        s = client.create_session(prefix="ticks:\\n")
        s.append("09:30:01 1651.25 3\\n", wait=True)
        print(s.query(" last price?", max_tokens=8, temperature=0).text)
        s.close()

A client built on your own ``httpx`` client (``http=``) should use
:func:`connection_limits`: it drops idle connections before the server does.

Errors are the typed exceptions of :mod:`vllm_stateful.errors` (and
:mod:`vllm_stateful.server.errors` for credentials), carrying the server's
message. Imports neither vLLM nor FastAPI.
"""

from vllm_stateful.client._wire import connection_limits
from vllm_stateful.client.aio import AsyncClient, AsyncSession
from vllm_stateful.client.sync import Client, Session
from vllm_stateful.errors import (
    AccessDeniedError,
    AppendTooLargeError,
    BacklogFullError,
    BudgetExceededError,
    CommitConflictError,
    ContextLengthError,
    EngineDeadError,
    IngestionFailedError,
    InvalidInputError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
    SlideInProgressError,
    StatefulError,
    TenantLimitError,
)
from vllm_stateful.server.errors import (
    ApiKeyError,
    ModelNotFoundError,
    SessionsUnavailableError,
    UnauthorizedError,
)
from vllm_stateful.server.schemas import Completion, SessionStats

__all__ = [
    "AccessDeniedError",
    "AppendTooLargeError",
    "ApiKeyError",
    "AsyncClient",
    "AsyncSession",
    "BacklogFullError",
    "BudgetExceededError",
    "CommitConflictError",
    "Client",
    "Completion",
    "ContextLengthError",
    "EngineDeadError",
    "IngestionFailedError",
    "InvalidInputError",
    "ModelNotFoundError",
    "Session",
    "SessionClosedError",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionStats",
    "SlideInProgressError",
    "SessionsUnavailableError",
    "StatefulError",
    "TenantLimitError",
    "UnauthorizedError",
    "connection_limits",
]
