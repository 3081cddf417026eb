"""What the sync and async clients share: requests as data, response parsing,
error mapping, SSE framing and connection limits. No I/O here, so both
clients stay thin."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import ValidationError

from vllm_stateful.errors import StatefulError
from vllm_stateful.server.errors import ERRORS_BY_CODE, error_from_body, invalid_input
from vllm_stateful.server.schemas import (
    TOKEN_HEADER,
    Consistency,
    FlashRequest,
    SessionCompletionRequest,
)


@dataclass(frozen=True)
class Call:
    """One HTTP request of the session API."""

    method: str
    path: str
    json: dict[str, Any] | None = None
    params: dict[str, str] = field(default_factory=dict)
    token: str | None = None

    def headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: self.token} if self.token else {}


# A connection idle this long is dropped by the client, before the server
# drops it: vLLM's server (uvicorn) closes a connection idle for
# VLLM_HTTP_TIMEOUT_KEEP_ALIVE (5 s), and so does httpx by default, so a
# request could go out on a connection the server was closing and fail with
# a ReadError (it stopped a benchmark's feed once in ~2,000 appends).
KEEPALIVE_EXPIRY_S = 2.0


def connection_limits(
    max_connections: int = 100, max_keepalive_connections: int = 20
) -> httpx.Limits:
    """httpx's connection limits (its defaults) with ``KEEPALIVE_EXPIRY_S``."""
    return httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive_connections,
        keepalive_expiry=KEEPALIVE_EXPIRY_S,
    )


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def create_call(
    prefix: str | list[int],
    session_id: str | None,
    ttl_s: float | None,
    flash: list[dict[str, Any]] | None = None,
    overflow: str | None = None,
    max_tokens: int | None = None,
) -> Call:
    body: dict[str, Any] = {"prefix": prefix}
    if overflow is not None:
        body["overflow"] = overflow
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if flash:
        body["flash"] = [_flash_body(f) for f in flash]
    if session_id is not None:
        body["session_id"] = session_id
    if ttl_s is not None:
        body["ttl_s"] = ttl_s
    return Call("POST", "/v1/sessions", json=body)


def append_call(session_id: str, token: str, data: str | list[int], wait: bool) -> Call:
    body = {"text": data} if isinstance(data, str) else {"token_ids": list(data)}
    params = {"wait": "true"} if wait else {}
    return Call("POST", f"/v1/sessions/{session_id}/append", json=body, params=params, token=token)


def query_call(
    session_id: str,
    token: str,
    prompt: str | list[int],
    *,
    stream: bool,
    max_tokens: int | None,
    temperature: float | None,
    consistency: Consistency,
    commit: bool,
    sampling: dict[str, Any],
    max_staleness_ms: float | None = None,
) -> Call:
    # Validated here with the server's own schema: a bad argument fails
    # before any request is sent, with the message the server would give.
    try:
        req = SessionCompletionRequest(
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            consistency=consistency,
            commit=commit,
            stream=stream,
            max_staleness_ms=max_staleness_ms,
            **sampling,
        )
    except ValidationError as exc:
        raise invalid_input(exc) from None
    body = req.model_dump(exclude_unset=True, exclude_none=True)
    return Call("POST", f"/v1/sessions/{session_id}/completions", json=body, token=token)


def _flash_body(fields: dict[str, Any]) -> dict[str, Any]:
    # Validated with the server's schema before anything is sent.
    try:
        req = FlashRequest(**fields)
    except ValidationError as exc:
        raise invalid_input(exc) from None
    return req.model_dump(exclude_unset=True, exclude_none=True)


def flash_call(session_id: str, token: str, fields: dict[str, Any]) -> Call:
    body = _flash_body(fields)
    return Call("POST", f"/v1/sessions/{session_id}/flash", json=body, token=token)


def raise_for(status: int, content: bytes, retry_after: str | None = None) -> None:
    """Raise the typed error a non-2xx response carries (``retry_after``:
    the ``Retry-After`` header, for the errors that carry one)."""
    if status < 400:
        return
    try:
        body: Any = json.loads(content)
    except ValueError:
        body = {"error": {"message": content.decode(errors="replace") or f"HTTP {status}"}}
    raise error_from_body(status, body, retry_after)


class SSEParser:
    """Server-sent events, fed one line at a time; ``feed`` returns
    ``(event, data)`` when a message is complete. Comments (the server's
    keep-alives) are skipped."""

    def __init__(self) -> None:
        self.event, self.data = "message", []

    def feed(self, line: str) -> tuple[str, str] | None:
        if not line:
            out = (self.event, "\n".join(self.data)) if self.data else None
            self.event, self.data = "message", []
            return out
        if line.startswith("event:"):
            self.event = line[6:].strip()
        elif line.startswith("data:"):
            self.data.append(line[5:].lstrip(" "))
        return None


def completion_delta(data: str) -> str | None:
    """Text of one streamed completion chunk; None for ``[DONE]``; raises the
    error a stream may end with."""
    if data == "[DONE]":
        return None
    obj = json.loads(data)
    if "error" in obj:
        # Inside a 200 stream the status is lost; the code names the error.
        cls = ERRORS_BY_CODE.get(obj["error"].get("code"), StatefulError)
        raise error_from_body(cls.http_status, obj)
    choices = obj.get("choices") or []
    return choices[0].get("text", "") if choices else ""


def event_dict(data: str) -> dict[str, Any]:
    return json.loads(data)


# The server ends an events stream after these ("dropped": this reader fell
# too far behind).
FINAL_EVENTS = ("closed", "evicted", "dropped")

__all__ = ["Call", "StatefulError"]
