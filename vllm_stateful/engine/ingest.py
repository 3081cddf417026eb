"""Ingestion: turns a session's appended tokens into pinned KV.

One engine request at a time per session keeps the order. Each request
covers at most ``ingest_chunk_tokens`` new tokens past the previous pin,
starting from the newest tokens appended, which coalesces everything that
piled up meanwhile; it computes only those tokens (the prefix cache and the
connector's tail copy supply the rest), and the connector pins its prompt
when it finishes. Chunk ends are internal: ``ingested_version`` only moves to
real versions, the largest whose length is pinned.

A session's loop ingests its own log (up to ``log_version``); while a slide
builds the next window, the window is a session of its own with its own loop
(``engine/slide.py``).
"""

from __future__ import annotations

import asyncio
import bisect
import time
from typing import Awaitable, Callable

from vllm.outputs import RequestOutput

from vllm_stateful import metrics
from vllm_stateful.engine.rpc import EngineRPC, one_token
from vllm_stateful.engine.session import Session, SessionEvent
from vllm_stateful.protocol import EngineReport, Op

# (session, prompt, since) -> the first output of the chunk, or None.
Ride = Callable[[Session, list[int], float], Awaitable[RequestOutput | None]]

# Weight of the newest measurement in the smoothed ingest rate.
RATE_SMOOTHING = 0.3


def smooth(previous: float | None, sample: float) -> float:
    if previous is None:
        return sample
    return (1.0 - RATE_SMOOTHING) * previous + RATE_SMOOTHING * sample


class Ingestor:
    def __init__(
        self,
        rpc: EngineRPC,
        chunk_tokens: int,
        on_new_version: Callable[[], None],
        on_ingested: Callable[[Session], None],
        ride: Ride | None = None,
    ):
        assert chunk_tokens >= 1
        self.rpc = rpc
        self.chunk_tokens = chunk_tokens
        # Smoothed over every session's ingest requests: the pace of one
        # ingestion stream on this server, for sessions not yet measured.
        self.rate_tps: float | None = None
        # Called before a chunk is sent (running flash evaluations look at
        # an older version) and after a version is ingested.
        self._on_new_version = on_new_version
        self._on_ingested = on_ingested
        # Sends a version's last chunk with a flash question riding it, if
        # the session has one (engine/flash_ride.py); None: a plain append.
        self._ride = ride

    def kick(self, session: Session) -> None:
        """Make sure the session's ingestion loop runs (after a failure, this
        is the retry)."""
        if session.ingest_task is None or session.ingest_task.done():
            # The retry starts now: a waiter that arrives before the task's
            # first step must wait for it, not see the previous failure.
            session.ingest_error = None
            session.ingest_task = asyncio.create_task(self._loop(session))

    async def _loop(self, session: Session) -> None:
        while not session.closed and session.ingested_version < session.log_version:
            # A retry is starting: waiters must see this attempt, not the
            # previous one's failure.
            session.ingest_error = None
            end = min(len(session.tokens), session.ingested_tokens + self.chunk_tokens)
            if end == session.ingested_tokens:  # an empty prefix: nothing to compute or pin
                await self._advance(session)
                continue
            prompt_ids = session.tokens[:end]
            self._on_new_version()
            start = time.monotonic()
            since = time.time() - session.ingest_lag_s(start)  # the engine paces by it
            try:
                out = None
                if self._ride is not None and end == len(session.tokens):
                    out = await self._ride(session, prompt_ids, since)
                rode = out is not None
                if out is None:
                    out = await self.rpc.final(
                        session.key, prompt_ids, one_token(), Op.APPEND, since
                    )
            except Exception as exc:  # surfaced to waiters; the log is kept
                session.ingest_error = exc
                async with session.changed:
                    session.changed.notify_all()
                return
            elapsed = time.monotonic() - start
            computed = len(prompt_ids) - (out.num_cached_tokens or 0)
            session.ingest_requests += 1
            session.ingest_computed_tokens += computed
            metrics.INGEST_REQUESTS.inc()
            metrics.INGEST_COMPUTED_TOKENS.inc(computed)
            if computed > 0 and elapsed > 0:
                session.ingest_rate_tps = smooth(session.ingest_rate_tps, computed / elapsed)
                self.rate_tps = smooth(self.rate_tps, computed / elapsed)
            if rode:  # the engine pinned the data before this first output
                session.pinned_tokens = end
            else:
                report = EngineReport.from_params(out.kv_transfer_params)
                session.pinned_tokens = report.session_pinned_tokens if report else 0
            if session.pinned_tokens:  # an offloaded session's copy was loaded back
                session.offloaded = False
            session.ingested_tokens = end
            await self._advance(session)

    async def _advance(self, session: Session) -> None:
        """Move ``ingested_version`` to the newest version now fully
        ingested, if any; one ``ingested`` event for it."""
        # lengths is strictly increasing (appends are never empty).
        index = bisect.bisect_right(session.lengths, session.ingested_tokens) - 1
        version = session.first_version + index
        if index < 0 or version <= session.ingested_version:
            return
        now = time.monotonic()
        lag_s = 0.0
        while session.unacked and session.unacked[0][0] <= version:
            _, appended_at = session.unacked.popleft()
            metrics.INGEST_LAG.observe(now - appended_at)
            lag_s = max(lag_s, now - appended_at)
        session.ingested_version = version
        session.ingested_history.append((version, now))
        async with session.changed:
            session.changed.notify_all()
        session.publish(SessionEvent("ingested", version, {
            "tokens": session.lengths[index],
            "lag_s": lag_s,  # from the oldest append this covers to now
            "backlog_tokens": session.backlog_tokens,
            "rate_tps": session.ingest_rate_tps,
        }))
        self._on_ingested(session)
