"""Completion routes: a question answered from a session.

``/v1/sessions/{id}/completions`` and ``.../chat/completions``, and vLLM's
own ``/v1/completions`` and ``/v1/chat/completions``, which look for
``session_id`` in the body before deciding whether the stock vLLM handler
should have the request. Answers come whole or as an OpenAI ``data:``
stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from vllm_stateful.errors import InvalidInputError, SessionNotFoundError, StatefulError
from vllm_stateful.server import openai_objects as objects
from vllm_stateful.server.auth import authorize
from vllm_stateful.server.chat import render_chat
from vllm_stateful.server.delegate import Delegate
from vllm_stateful.server.errors import ModelNotFoundError, error_body
from vllm_stateful.server.http import (
    handles_errors,
    json_response,
    parse_body,
    read_body,
    unless_disconnected,
)
from vllm_stateful.server.openapi import operation
from vllm_stateful.server.sampling import (
    COMPLETION_MAX_TOKENS,
    build_sampling_params,
    resolve_max_tokens,
)
from vllm_stateful.server.schemas import (
    SessionChatRequest,
    SessionCompletionRequest,
    SessionInfo,
    SessionQuery,
)
from vllm_stateful.server.sse import DONE, SSE_HEADERS, data_line
from vllm_stateful.server.state import ServerState, server_state

router = APIRouter()


@router.post(
    "/v1/sessions/{session_id}/completions", openapi_extra=operation(SessionCompletionRequest)
)
@handles_errors
async def session_completions(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    body = await read_body(request, SessionCompletionRequest)
    return await _answer(st, request, session_id, body)


@router.post(
    "/v1/sessions/{session_id}/chat/completions", openapi_extra=operation(SessionChatRequest)
)
@handles_errors
async def session_chat(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    body = await read_body(request, SessionChatRequest)
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
    return await _answer(st, request, session_id, parse_body(raw, model))


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
    if body.consistency == "latest":
        # A window being built holds the newest version (engine/slide.py).
        log = session.window or session
        prompt_len = len(log.tokens) + len(question)
    elif session.ingested_version < session.first_version:  # not yet ingested
        prompt_len = session.lengths[0] + len(question)
    else:
        prompt_len = session.length_at(session.ingested_version) + len(question)
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

    result = await unless_disconnected(
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
    return json_response(build(model, info, result, body.return_token_ids))


async def _stream(st, request, session_id, body, question, params, model, chat) -> Response:
    stream = st.engine.query_stream(
        session_id, question, params, body.consistency, body.max_staleness_ms
    )
    # The first chunk is awaited before the response starts, so errors found
    # while preparing the query (unknown version, context length) still get
    # their status code instead of an error inside a 200 stream.
    try:
        first = await unless_disconnected(request, stream.__anext__())
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

    return StreamingResponse(sse(), media_type="text/event-stream", headers=SSE_HEADERS)


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
