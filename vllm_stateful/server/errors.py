"""Errors of the HTTP layer and their OpenAI-format bodies.

The engine's typed errors (``vllm_stateful.errors``) carry ``http_status``
and ``code``; this module adds the few that only HTTP has (credentials,
unknown model, sessions not enabled) and turns any of them into
``{"error": {"message", "type", "param", "code"}}``. Imports only pydantic,
because the client maps bodies back to exception classes with it.
"""

from __future__ import annotations

from pydantic import ValidationError

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
    SessionRestoringError,
    SlideInProgressError,
    StatefulError,
    StoreWriteError,
    TenantLimitError,
)


class UnauthorizedError(StatefulError):
    """No credentials: the session token (or vLLM's API key) is missing."""

    http_status = 401
    code = "session_token_required"


class ApiKeyError(UnauthorizedError):
    """vLLM's ``--api-key`` middleware refused the request (its own body)."""

    code = "invalid_api_key"


class ModelNotFoundError(StatefulError):
    http_status = 404
    code = "model_not_found"


class SessionsUnavailableError(StatefulError):
    """The engine was started without the session connector."""

    http_status = 503
    code = "sessions_unavailable"


# OpenAI's error ``type`` by status; the ``code`` says which error exactly.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}

ERRORS_BY_CODE: dict[str, type[StatefulError]] = {
    cls.code: cls
    for cls in (
        InvalidInputError,
        SessionNotFoundError,
        SessionClosedError,
        SessionExistsError,
        ContextLengthError,
        BudgetExceededError,
        BacklogFullError,
        IngestionFailedError,
        CommitConflictError,
        EngineDeadError,
        TenantLimitError,
        AccessDeniedError,
        UnauthorizedError,
        ApiKeyError,
        ModelNotFoundError,
        SessionsUnavailableError,
        SessionRestoringError,
        StoreWriteError,
        AppendTooLargeError,
        SlideInProgressError,
    )
}
ERRORS_BY_STATUS: dict[int, type[StatefulError]] = {
    400: InvalidInputError,
    401: UnauthorizedError,
    403: AccessDeniedError,
    404: SessionNotFoundError,
    409: SessionExistsError,
    413: ContextLengthError,
    422: InvalidInputError,
    429: BudgetExceededError,
    503: SessionsUnavailableError,
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(exc: StatefulError, param: str | None = None) -> dict:
    """The OpenAI-format body for ``exc``."""
    return {
        "error": {
            "message": exc.message,
            "type": error_type(exc.http_status),
            "param": param if param is not None else getattr(exc, "param", None),
            "code": exc.code,
        }
    }


def invalid_input(exc: ValidationError) -> InvalidInputError:
    """A pydantic validation error as one readable 400, naming the field."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith("function"))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "unknown field"
    err = InvalidInputError(f"{loc}: {msg}" if loc else msg)
    err.param = loc or None  # type: ignore[attr-defined]
    if len(exc.errors()) > 1:
        err.message += f" (and {len(exc.errors()) - 1} more)"
    return err


def error_from_body(
    status: int, body: object, retry_after: str | None = None
) -> StatefulError:
    """Rebuild the typed error from a response (the client's side).

    Falls back on the status when the body is not ours (vLLM's own
    ``{"error": "Unauthorized"}`` from ``--api-key``, or its error format with
    an integer ``code``). ``retry_after`` is the ``Retry-After`` header; it
    sets ``retry_after_s`` on the errors that carry one.
    """
    message, code, param = f"HTTP {status}", None, None
    if isinstance(body, dict) and "error" in body:
        err = body["error"]
        if isinstance(err, dict):
            message = str(err.get("message", message))
            code, param = err.get("code"), err.get("param")
        elif isinstance(err, str):
            message = err
    if status == 401 and code is None:
        cls: type[StatefulError] = ApiKeyError
    else:
        cls = ERRORS_BY_CODE.get(code) if isinstance(code, str) else None  # type: ignore[assignment]
        cls = cls or ERRORS_BY_STATUS.get(status, StatefulError)
    exc = cls(message)
    if exc.http_status != status:
        exc.http_status = status  # keep what the server said
    exc.param = param  # type: ignore[attr-defined]
    if hasattr(exc, "retry_after_s") and retry_after is not None:
        try:
            exc.retry_after_s = float(retry_after)  # type: ignore[attr-defined]
        except ValueError:  # an HTTP date: keep the default
            pass
    return exc
