"""What a session question returns."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class QueryResult:
    """An answer; from :meth:`StatefulEngine.query_stream`, one delta of it
    (``text`` and ``token_ids`` are the new part; the last has
    ``finish_reason``)."""

    text: str
    token_ids: list[int]
    version: int  # the session version the answer saw
    prompt_tokens: int
    computed_tokens: int  # prompt tokens the engine computed (vLLM's counter)
    finish_reason: str | None
    committed_version: int | None = None
    flash: bool = False  # answered from a flash query's cache
    computed_at: float | None = None  # when a flash answer was computed
    # 0 when the answer is on the newest ingested version; else ms since the
    # version that superseded it was ingested (bounded-staleness flash hits).
    staleness_ms: float = 0.0


@dataclass(frozen=True)
class EngineKVStats:
    free_blocks: int
    total_blocks: int
    block_size: int
    pinned_blocks: int
