"""Server-sent events: OpenAI-style ``data:`` streams and session events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel

DONE = "data: [DONE]\n\n"
# Headers of every event stream: no caching, and no buffering by a proxy
# (nginx's header) that would hold events back.
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
# Session event types after which the stream ends: the session is gone, or
# this reader fell too far behind and was dropped.
FINAL_EVENTS = ("closed", "evicted", "dropped")


def data_line(obj: BaseModel | dict[str, Any]) -> str:
    # Nulls are kept: OpenAI's chunks carry "finish_reason": null until the end.
    payload = obj.model_dump_json() if isinstance(obj, BaseModel) else json.dumps(obj)
    return f"data: {payload}\n\n"


def event_block(event: str, data: BaseModel) -> str:
    return f"event: {event}\ndata: {data.model_dump_json()}\n\n"


async def with_keepalive(queue: asyncio.Queue, interval_s: float) -> AsyncIterator[Any | None]:
    """Items of ``queue``; ``None`` whenever ``interval_s`` passes without one
    (the caller sends an SSE comment, so proxies keep the connection open)."""
    while True:
        try:
            yield await asyncio.wait_for(queue.get(), interval_s)
        except asyncio.TimeoutError:
            yield None


KEEPALIVE = ": keep-alive\n\n"
