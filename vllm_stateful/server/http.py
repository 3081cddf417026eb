"""What every route handler shares: JSON and error responses, body parsing,
query flags, and cancelling work when the client disconnects.

Handlers read and validate their bodies themselves (not through FastAPI's
parameter binding) so that every error, malformed JSON included, leaves in
the OpenAI format of ``server/errors.py`` with its own status.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from vllm.exceptions import VLLMClientError

from vllm_stateful.errors import InvalidInputError, StatefulError
from vllm_stateful.server.errors import error_body, invalid_input

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


class Disconnected(Exception):
    """The client went away while its request was being answered."""


def json_response(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


def error_response(exc: StatefulError) -> JSONResponse:
    response = JSONResponse(error_body(exc), status_code=exc.http_status)
    retry_s = getattr(exc, "retry_after_s", None)
    if retry_s is not None:
        # Whole seconds (RFC 9110); never 0, which would invite a busy loop.
        response.headers["Retry-After"] = str(max(1, math.ceil(retry_s)))
    return response


def handles_errors(
    handler: Callable[..., Awaitable[Response]],
) -> Callable[..., Awaitable[Response]]:
    """Typed errors to OpenAI-format responses.

    vLLM's client errors and ``ValueError`` from its input checks (bad
    sampling values, a prompt the engine refuses) are bad input too, as
    vLLM's own handlers treat them.
    """

    @functools.wraps(handler)
    async def wrapper(*args: Any, **kwargs: Any) -> Response:
        start = time.perf_counter()
        try:
            response = await handler(*args, **kwargs)
        except StatefulError as exc:
            response = error_response(exc)
        except Disconnected:
            return Response(status_code=499)
        except (VLLMClientError, ValueError) as exc:
            response = error_response(InvalidInputError(str(exc)))
        # Time spent in the handler (for a stream: until its headers), so
        # clients can tell server time from network and queueing time.
        ms = (time.perf_counter() - start) * 1e3
        response.headers["Server-Timing"] = f"app;dur={ms:.3f}"
        return response

    return wrapper


def parse_body(raw: bytes, model: type[M], default: dict | None = None) -> M:
    """``raw`` as ``model``; an empty body is ``default`` when one is given.
    Anything else than a JSON object that validates is a 400."""
    if not raw.strip() and default is not None:
        obj: Any = default
    else:
        try:
            obj = json.loads(raw)
        except ValueError:
            raise InvalidInputError("the request body is not valid JSON") from None
    if not isinstance(obj, dict):
        raise InvalidInputError("the request body must be a JSON object")
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise invalid_input(exc) from None


async def read_body(request: Request, model: type[M], default: dict | None = None) -> M:
    return parse_body(await request.body(), model, default)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run ``work``; cancel it if the client disconnects first (so a dropped
    query does not keep the engine busy). The body must have been read."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        finished, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when this handler is cancelled itself (server shutdown).
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task not in finished:
        raise Disconnected()
    return task.result()


def flag(request: Request, name: str) -> bool:
    """Boolean query parameter ``name``: absent is false."""
    raw = request.query_params.get(name)
    if raw is None:
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise InvalidInputError(f"query parameter '{name}' must be true or false, got {raw!r}")
