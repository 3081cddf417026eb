"""Session routes: create, list, stats, close, append, and the events
stream."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from vllm_stateful.errors import InvalidInputError
from vllm_stateful.server.auth import authorize, opens, require_tokens
from vllm_stateful.server.http import (
    flag,
    handles_errors,
    json_response,
    read_body,
    unless_disconnected,
)
from vllm_stateful.server.openapi import operation
from vllm_stateful.server.routes.flash import flash_spec
from vllm_stateful.server.schemas import (
    AppendRequest,
    AppendResponse,
    CloseResponse,
    CreateSessionRequest,
    CreateSessionResponse,
    SessionEvent,
    SessionList,
    SessionStats,
)
from vllm_stateful.server.sse import (
    FINAL_EVENTS,
    KEEPALIVE,
    SSE_HEADERS,
    event_block,
    with_keepalive,
)
from vllm_stateful.server.state import ServerState, server_state

router = APIRouter()


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
    stats = dataclasses.asdict(st.engine.get_session(session_id))
    return SessionStats(**stats, replica=st.replica)


@router.post("/v1/sessions", status_code=201, openapi_extra=operation(
    CreateSessionRequest, token=False, body_required=False
))  # fmt: skip
@handles_errors
async def create_session(request: Request) -> Response:
    st = server_state(request)
    body = await read_body(request, CreateSessionRequest, default={})
    flash = [flash_spec(st, f) for f in body.flash]
    # Cancelled when the client hangs up first: the engine then rolls the
    # session back (nobody would ever hold its token), budget and pin
    # included.
    session = await unless_disconnected(
        request,
        st.engine.create_session(
            body.prefix,
            body.session_id or st.new_session_id(),
            body.ttl_s,
            flash,
            tenant=_tenant(st, request),
            overflow=body.overflow,
            max_tokens=body.max_tokens,
        ),
    )
    out = CreateSessionResponse(
        id=session.id,
        token=session.access_token,
        tokens=len(session.tokens),
        version=session.version,
    )
    return json_response(out, 201)


@router.get("/v1/sessions", openapi_extra=operation())
@handles_errors
async def list_sessions(request: Request) -> Response:
    """Only the sessions that the caller's tokens open: ids are caller-chosen
    names, and one tenant must not learn another's."""
    st = server_state(request)
    tokens = require_tokens(request)
    ids = [s.id for s in list(st.engine.sessions.values()) if opens(s, tokens)]
    return json_response(SessionList(data=[_stats(st, i) for i in ids]))


@router.get("/v1/sessions/{session_id}", openapi_extra=operation())
@handles_errors
async def get_session(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    return json_response(_stats(st, session_id))


@router.delete("/v1/sessions/{session_id}", openapi_extra=operation())
@handles_errors
async def close_session(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    await st.engine.close_session(session_id)
    return json_response(CloseResponse(id=session_id))


@router.post("/v1/sessions/{session_id}/append", status_code=202, openapi_extra=operation(
    AppendRequest, query={"wait": {"type": "boolean"}}
))  # fmt: skip
@handles_errors
async def append(session_id: str, request: Request) -> Response:
    """202 with the new version; ``?wait=true``: 200 once it is ingested."""
    st = server_state(request)
    authorize(st.engine, session_id, request)
    wait = flag(request, "wait")
    body = await read_body(request, AppendRequest)
    version = await st.engine.append(session_id, body.data)
    if not wait:
        return json_response(AppendResponse(version=version), 202)
    ingested = await unless_disconnected(request, st.engine.wait_ingested(session_id, version))
    return json_response(AppendResponse(version=version, ingested_version=ingested))


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

    return StreamingResponse(stream(), media_type="text/event-stream", headers=SSE_HEADERS)
