"""Operator routes: ``GET /v1/stateful/reconcile``.

Under ``/v1``, so vLLM's ``--api-key`` guards it like every other route. The
answer names no session: the API key is shared by every client of a server,
and session ids are the clients' business (mismatches are logged with ids).
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from vllm.logger import init_logger

from vllm_stateful.server.http import handles_errors
from vllm_stateful.server.state import server_state

logger = init_logger(__name__)
router = APIRouter()


class ReconcileMismatch(BaseModel):
    kind: str  # "tokens_differ" | "pin_without_session"
    api_tokens: int
    engine_tokens: int


class ReconcileReport(BaseModel):
    object: str = "stateful.reconciliation"
    agree: bool
    mismatches: list[ReconcileMismatch]
    open_sessions: int
    ending_sessions: int  # closing, or release failed: still budgeted
    failed_sessions: int
    skipped: int  # ingestion or release in flight: not compared
    api_pinned_tokens: int
    engine_pinned_tokens: int
    engine_pins: int
    pinned_blocks: int
    free_blocks: int
    total_blocks: int


@router.get("/v1/stateful/reconcile")
@handles_errors
async def reconcile(request: Request) -> Response:
    """Engine-side pins against API-side accounting (``StatefulEngine.reconcile``)."""
    result = await server_state(request).engine.reconcile()
    for line in result.details:
        logger.warning("vllm-stateful reconcile: %s", line)
    report = ReconcileReport(
        agree=result.agree,
        mismatches=[
            ReconcileMismatch(kind=m.kind, api_tokens=m.api_tokens, engine_tokens=m.engine_tokens)
            for m in result.mismatches
        ],
        open_sessions=result.open_sessions,
        ending_sessions=result.ending_sessions,
        failed_sessions=result.failed_sessions,
        skipped=result.skipped,
        api_pinned_tokens=result.api_pinned_tokens,
        engine_pinned_tokens=result.engine_pinned_tokens,
        engine_pins=result.engine_pins,
        pinned_blocks=result.pinned_blocks,
        free_blocks=result.free_blocks,
        total_blocks=result.total_blocks,
    )
    return JSONResponse(report.model_dump(mode="json"))
