"""Request classes on the engine side, read from the tag the plugin puts in
a request's sampling params (``protocol.py``); requests without one are not
the plugin's (stateless OpenAI traffic) and are foreground."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

from vllm_stateful.protocol import Op, RequestTag

if TYPE_CHECKING:
    from vllm.v1.request import Request


class Lane(enum.IntEnum):
    """Request classes; a lower value is served first."""

    FOREGROUND = 0
    INGEST = 1
    FLASH = 2


_LANE_OF_OP = {Op.APPEND: Lane.INGEST, Op.FLASH: Lane.FLASH}


def tag_of(request: Request) -> RequestTag | None:
    params = request.sampling_params
    return None if params is None else RequestTag.from_extra_args(params.extra_args)


def lane_for(tag: RequestTag | None, request: Request) -> Lane:
    if tag is None:
        return Lane.FOREGROUND
    if tag.data_tokens is not None and request.num_computed_tokens >= request.num_prompt_tokens:
        # An append a flash question rides: its data is ingested and pinned
        # once the prompt is computed; what is left is the flash answer.
        return Lane.FLASH
    return _LANE_OF_OP.get(tag.op, Lane.FOREGROUND)


def lane_of(request: Request) -> Lane:
    return lane_for(tag_of(request), request)


def asks(tag: RequestTag | None) -> bool:
    """A session question, or any request that is not the plugin's. Control
    requests (close, probe, offload) are foreground for ordering (one token
    someone waits for) but not questions: they must not make the scheduler
    pace ingestion as if questions were coming, or a feed that closes or
    probes sessions would ingest in short steps for ``active_window_s``."""
    return tag is None or tag.op is Op.QUERY


def is_question(request: Request) -> bool:
    return asks(tag_of(request))


def data_since(request: Request, tag: RequestTag | None) -> float:
    """When (wall clock) the oldest data an ingestion request carries was
    acknowledged; its arrival without the tag's word (vLLM stamps wall
    time)."""
    since = None if tag is None else tag.since
    return request.arrival_time if since is None else min(since, request.arrival_time)
