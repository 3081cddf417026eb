"""Flash query routes: register, list and drop a session's flash queries."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from vllm_stateful.server.auth import authorize
from vllm_stateful.server.http import handles_errors, json_response, read_body
from vllm_stateful.server.openapi import operation
from vllm_stateful.server.sampling import COMPLETION_MAX_TOKENS, build_sampling_params
from vllm_stateful.server.schemas import (
    FlashAnswer,
    FlashDeleted,
    FlashInfo,
    FlashList,
    FlashRequest,
)
from vllm_stateful.server.state import ServerState, server_state

router = APIRouter()


@router.post(
    "/v1/sessions/{session_id}/flash", status_code=201, openapi_extra=operation(FlashRequest)
)
@handles_errors
async def register_flash(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    body = await read_body(request, FlashRequest)
    fq = await st.engine.register_flash(session_id, **flash_spec(st, body))
    return json_response(_flash_info(fq, None), 201)


@router.get("/v1/sessions/{session_id}/flash", openapi_extra=operation())
@handles_errors
async def list_flash(session_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    infos = [_flash_info(fq, r) for fq, r in st.engine.list_flash(session_id)]
    return json_response(FlashList(data=infos))


@router.delete("/v1/sessions/{session_id}/flash/{flash_id}", openapi_extra=operation())
@handles_errors
async def drop_flash(session_id: str, flash_id: str, request: Request) -> Response:
    st = server_state(request)
    authorize(st.engine, session_id, request)
    st.engine.drop_flash(session_id, flash_id)
    return json_response(FlashDeleted(id=flash_id))


def flash_spec(st: ServerState, body: FlashRequest) -> dict[str, Any]:
    """Keyword arguments of ``StatefulEngine.register_flash`` (also for the
    flash queries of a create). Sampling is built exactly as for a
    completion, so a completion with the same fields finds the cached
    answer."""
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
