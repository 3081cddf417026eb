"""HTTP routes of the session API.

Handlers read and validate their bodies themselves (not through FastAPI's
parameter binding) so that every error, malformed JSON included, leaves in
the OpenAI format of ``server/errors.py`` with its own status, and so that
``/v1/completions`` can look for ``session_id`` before deciding whether the
stock vLLM handler should have the request.

Every handler validates everything before it calls the engine, and the
engine refuses bad input before it changes a session: a rejected request
changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from vllm.exceptions import VLLMClientError

from vllm_stateful.errors import InvalidInputError, SessionNotFoundError, StatefulError
from vllm_stateful.server import openai_objects as objects
from vllm_stateful.server.auth import authorize, opens, require_tokens
from vllm_stateful.server.chat import render_chat
from vllm_stateful.server.delegate import Delegate
from vllm_stateful.server.errors import ModelNotFoundError, error_body, invalid_input
from vllm_stateful.server.openapi import operation
from vllm_stateful.server.sampling import (
    COMPLETION_MAX_TOKENS,
    build_sampling_params,
    resolve_max_tokens,
)
from vllm_stateful.server.schemas import (
    AppendRequest,
    AppendResponse,
    CloseResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    FlashAnswer,
    FlashDeleted,
    FlashInfo,
    FlashList,
    FlashRequest,
    SessionChatRequest,
    SessionCompletionRequest,
    SessionEvent,
    SessionInfo,
    SessionList,
    SessionQuery,
    SessionStats,
)
from vllm_stateful.server.sse import (
    DONE,
    FINAL_EVENTS,
    KEEPALIVE,
    data_line,
    event_block,
    with_keepalive,
)
from vllm_stateful.server.state import ServerState, server_state

router = APIRouter()
M = TypeVar("M", bound=BaseModel)


class _Disconnected(Exception):
    """The client went away while its request was being answered."""


def _json(model: BaseModel, status: int = 200) -> JSONResponse:
    return JSONResponse(model.model_dump(mode="json"), status_code=status)


def _error(exc: StatefulError) -> JSONResponse:
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
            response = _error(exc)
        except _Disconnected:
            return Response(status_code=499)
        except (VLLMClientError, ValueError) as exc:
            response = _error(InvalidInputError(str(exc)))
        # Time spent in the handler (for a stream: until its headers), so
        # clients can tell server time from network and queueing time.
        ms = (time.perf_counter() - start) * 1e3
        response.headers["Server-Timing"] = f"app;dur={ms:.3f}"
        return response

    return wrapper


def _parse(raw: bytes, model: type[M], default: dict | None = None) -> M:
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


async def _body(request: Request, model: type[M], default: dict | None = None) -> M:
    return _parse(await request.body(), model, default)


T = TypeVar("T")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
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
        raise _Disconnected()
    return task.result()


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise InvalidInputError(f"query parameter '{name}' must be true or false, got {raw!r}")


def _tenant(st: ServerState, request: Request) -> str | None:
    """The tenant named by the configured header (``tenant_header``); None
    (tenant "default") when the header is absent or blank."""
    raw = request.headers.get(st.engine.config.tenant_header, "").strip()
    if len(raw) > 256:
        raise InvalidInputError(
            f"header {st.engine.config.tenant_header} is longer than 256 characters"
        )
    return raw or None


def _stats(st: ServerState, session_id: str) -> SessionStats:
    return SessionStats(**dataclasses.asdict(st.engine.get_session(session_id)))


# ------------------------------------------------------------------ sessions


@router.post("/v1/sessions", status_code=201, openapi_extra=operation(
    CreateSessionRequest, token=False, body_required=False
))  # fmt: skip
@handles_errors
async def create_session(request: Request) -> Response:
    st = server_state(request)
    body = await _body(request, CreateSessionRequest, default={})
    flash = [_flash_spec(st, f) for f in body.flash]
    # Cancelled when the client hangs up first: the engine then rolls the
    # session back (nobody would ever hold its token), budget and pin
    # included.
    session = await _unless_disconnected(
        request,
        st.engine.create_session(
            body.prefix, body.session_id, body.ttl_s, flash, tenant=_tenant(st, request)
        ),
    )
    out = CreateSessionResponse(
        id=session.id,
        token=session.access_token,
        tokens=len(session.tokens),
        version=session.version,
    )
    return _json(out, 201)


@router.get("/v1/sessions", openapi_extra=operation())
@handles_errors
async def list_sessions(request: Request) -> Response:
    """Only the sessions that the caller's tokens open: ids are caller-chosen
    names, and one tenant must not learn another's."""
    st = server_state(request)
    tokens = require_tokens(request)
    ids = [s.id for s in list(st.engine.sessions.values()) if opens(s, tokens)]
    return _json(SessionList(data=[_stats(st, i) for i in ids]))


@router.get("/v1/sessions/{session_id}", openapi_extra=operation())
@handles_errors
async def get_session(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    return _json(_stats(st, session_id))


@router.delete("/v1/sessions/{session_id}", openapi_extra=operation())
@handles_errors
async def close_session(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    await st.engine.close_session(session_id)
    return _json(CloseResponse(id=session_id))


@router.post("/v1/sessions/{session_id}/append", status_code=202, openapi_extra=operation(
    AppendRequest, query={"wait": {"type": "boolean"}}
))  # fmt: skip
@handles_errors
async def append(session_id: str, request: Request) -> Response:
    """202 with the new version; ``?wait=true``: 200 once it is ingested."""
    st = server_state(request)
    authorize(st.engine, session_id, request)
    wait = _flag(request, "wait")
    body = await _body(request, AppendRequest)
    version = await st.engine.append(session_id, body.data)
    if not wait:
        return _json(AppendResponse(version=version), 202)
    ingested = await _unless_disconnected(request, st.engine.wait_ingested(session_id, version))
    return _json(AppendResponse(version=version, ingested_version=ingested))


@router.get("/v1/sessions/{session_id}/events", openapi_extra=operation())
@handles_errors
async def events(session_id: str, request: Request) -> Response:
    """SSE: ``ingested`` per ingested version (coalesced appends give one
    event for the newest version), then ``closed`` or ``evicted`` last, or
    ``dropped`` when this reader fell ``max_event_queue`` events behind."""
    st = server_state(request)
    authorize(st.engine, session_id, request)
    # Subscribed before the response starts: a client that has the headers
    # misses no later event.
    queue = st.engine.subscribe(session_id)

    async def stream() -> AsyncIterator[str]:
        try:
            yield ": subscribed\n\n"
            async for ev in with_keepalive(queue, st.keepalive_s):
                if ev is None:
                    yield KEEPALIVE
                    continue
                out = SessionEvent(
                    type=ev.type, session_id=session_id, version=ev.version, data=ev.data
                )
                yield event_block(ev.type, out)
                if ev.type in FINAL_EVENTS:
                    return
        finally:
            st.engine.unsubscribe(session_id, queue)

    return StreamingResponse(stream(), media_type="text/event-stream", headers=_SSE_HEADERS)


_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

# --------------------------------------------------------------------- flash


@router.post(
    "/v1/sessions/{session_id}/flash", status_code=201, openapi_extra=operation(FlashRequest)
)
@handles_errors
async def register_flash(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    body = await _body(request, FlashRequest)
    fq = await st.engine.register_flash(session_id, **_flash_spec(st, body))
    return _json(_flash_info(fq, None), 201)


@router.get("/v1/sessions/{session_id}/flash", openapi_extra=operation())
@handles_errors
async def list_flash(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    return _json(FlashList(data=[_flash_info(fq, r) for fq, r in st.engine.list_flash(session_id)]))


@router.delete("/v1/sessions/{session_id}/flash/{flash_id}", openapi_extra=operation())
@handles_errors
async def drop_flash(session_id: str, flash_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    st.engine.drop_flash(session_id, flash_id)
    return _json(FlashDeleted(id=flash_id))


def _flash_spec(st: ServerState, body: FlashRequest) -> dict[str, Any]:
    """Keyword arguments of ``StatefulEngine.register_flash``. Sampling is
    built exactly as for a completion, so a completion with the same fields
    finds the cached answer."""
    max_tokens = body.max_tokens or st.model_defaults.get("max_tokens") or COMPLETION_MAX_TOKENS
    return {
        "prompt": body.prompt,
        "sampling_params": build_sampling_params(body, max_tokens, st.model_defaults),
        "flash_id": body.id,
        "only_changed": body.only_changed,
        "max_staleness_ms": body.max_staleness_ms,
    }


def _flash_info(fq: Any, result: Any) -> FlashInfo:
    latest = None
    if result is not None:
        latest = FlashAnswer(
            version=result.version,
            text=result.text,
            token_ids=result.token_ids,
            finish_reason=result.finish_reason,
            confidence=result.confidence,
            computed_at=result.computed_at,
        )
    return FlashInfo(
        id=fq.id,
        prompt=fq.prompt,
        max_tokens=fq.params.max_tokens,
        temperature=fq.params.temperature,
        seed=fq.params.seed,
        only_changed=fq.only_changed,
        max_staleness_ms=fq.max_staleness_ms,
        latest=latest,
    )


# --------------------------------------------------------------- completions


@router.post(
    "/v1/sessions/{session_id}/completions", openapi_extra=operation(SessionCompletionRequest)
)
@handles_errors
async def session_completions(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    body = await _body(request, SessionCompletionRequest)
    return await _answer(st, request, session_id, body)


@router.post(
    "/v1/sessions/{session_id}/chat/completions", openapi_extra=operation(SessionChatRequest)
)
@handles_errors
async def session_chat(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    body = await _body(request, SessionChatRequest)
    return await _answer(st, request, session_id, body)


@router.post("/v1/completions")
@handles_errors
async def completions(request: Request) -> Response:
    """vLLM's ``/v1/completions``, answered from a session when the body
    names one (``extra_body={"session_id": ...}``)."""
    return await _maybe_session(request, "/v1/completions", SessionCompletionRequest)


@router.post("/v1/chat/completions")
@handles_errors
async def chat_completions(request: Request) -> Response:
    return await _maybe_session(request, "/v1/chat/completions", SessionChatRequest)


async def _maybe_session(request: Request, path: str, model: type[SessionQuery]) -> Response:
    raw = await request.body()
    session_id = _session_id_of(raw)
    if session_id is None:
        route = request.app.state.stateful_stock_routes.get(path)
        if route is None:  # the model has no such stock route either
            raise InvalidInputError(f"{path} is not served by this model")
        return Delegate(route, raw)
    st = server_state(request)
    authorize(st.engine, session_id, request)
    return await _answer(st, request, session_id, _parse(raw, model))


def _session_id_of(raw: bytes) -> str | None:
    """``session_id`` of a JSON body; None when absent, null, or the body is
    not a JSON object (then the stock handler reports the problem)."""
    try:
        obj = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("session_id") is None:
        return None
    sid = obj["session_id"]
    if not isinstance(sid, str) or not sid:
        raise InvalidInputError("session_id must be a non-empty string")
    return sid


async def _answer(
    st: ServerState, request: Request, session_id: str, body: SessionQuery
) -> Response:
    if body.session_id is not None and body.session_id != session_id:
        raise InvalidInputError(
            f"session_id '{body.session_id}' in the body differs from '{session_id}' in the path"
        )
    model = _model_name(st, body.model)
    engine = st.engine
    chat = isinstance(body, SessionChatRequest)
    if chat:
        text = render_chat(
            engine.tokenizer,
            st.model_config,
            st.chat_template,
            body.messages,
            body.chat_template_kwargs,
        )
        question: str | list[int] = engine.encode(text)
    else:
        question = engine.encode(body.prompt)
    if not question:
        raise InvalidInputError("the question is empty after tokenization")
    session = engine.sessions.get(session_id)
    if session is None:  # closed while the body was being read
        raise SessionNotFoundError(f"session '{session_id}' not found")
    # The context the answer will see: the ingested version unless the
    # request asks for the latest. Used to cap max_tokens; the engine checks
    # the exact length again.
    version = session.version if body.consistency == "latest" else max(session.ingested_version, 0)
    prompt_len = session.lengths[version] + len(question)
    max_tokens = resolve_max_tokens(
        body.max_tokens,
        prompt_len,
        engine.max_model_len,
        st.model_defaults.get("max_tokens"),
        None if chat else COMPLETION_MAX_TOKENS,
    )
    params = build_sampling_params(body, max_tokens, st.model_defaults)

    if body.stream:
        return await _stream(st, request, session_id, body, question, params, model, chat)

    result = await _unless_disconnected(
        request,
        engine.query(
            session_id, question, params, body.consistency, body.commit, body.max_staleness_ms
        ),
    )
    info = SessionInfo(
        id=session_id,
        version=result.version,
        flash=result.flash,
        computed_at=result.computed_at,
        staleness_ms=result.staleness_ms,
        computed_tokens=result.computed_tokens,
        committed_version=result.committed_version,
    )
    build = objects.chat_completion if chat else objects.completion
    return _json(build(model, info, result, body.return_token_ids))


async def _stream(st, request, session_id, body, question, params, model, chat) -> Response:
    stream = st.engine.query_stream(
        session_id, question, params, body.consistency, body.max_staleness_ms
    )
    # The first chunk is awaited before the response starts, so errors found
    # while preparing the query (unknown version, context length) still get
    # their status code instead of an error inside a 200 stream.
    try:
        first = await _unless_disconnected(request, stream.__anext__())
    except BaseException:
        await _close(stream)
        raise
    writer = objects.ChunkWriter(model, session_id, chat, body.return_token_ids)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def sse() -> AsyncIterator[str]:
        try:
            yield data_line(writer.chunk(first))
            async for chunk in stream:
                yield data_line(writer.chunk(chunk))
            if include_usage:
                yield data_line(writer.usage_chunk())
        except StatefulError as exc:
            yield data_line(error_body(exc))
        finally:
            await _close(stream)
        yield DONE

    return StreamingResponse(sse(), media_type="text/event-stream", headers=_SSE_HEADERS)


async def _close(stream: Any) -> None:
    try:
        await stream.aclose()
    except (RuntimeError, StopAsyncIteration):  # already finished or running
        pass


def _model_name(st: ServerState, requested: str | None) -> str:
    if requested is None:
        return st.model_names[0]
    if requested not in st.model_names:
        raise ModelNotFoundError(f"The model `{requested}` does not exist.")
    return requested
