"""Flash answers that ride ingestion.

With the engine-side scheduler, one flash query of a session rides the
ingestion request of each version (``FlashRides.ride``): its prompt is the
version's tokens and then the question, so the question is computed in the
chunk's own step, and the answer is decoded as flash work after the engine
pinned the data (``RequestTag.data_tokens``, kv/connector.py). That saves an
evaluation its own request: the prefill step, the read of the pinned tail,
and the round trip from ``ingested`` to the engine. The session's other flash
queries are evaluated on their own (``FlashBook``).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from vllm.outputs import RequestOutput
from vllm.sampling_params import RequestOutputKind

from vllm_stateful import metrics
from vllm_stateful.errors import InvalidInputError
from vllm_stateful.protocol import Op

if TYPE_CHECKING:
    from vllm_stateful.engine.flash import FlashBook
    from vllm_stateful.engine.flash_query import FlashQuery
    from vllm_stateful.engine.session import Session


class FlashRides:
    def __init__(self, book: FlashBook):
        self.book = book
        self._tasks: set[asyncio.Task] = set()  # answers decoding

    def _rider(self, session: Session, data_tokens: int) -> FlashQuery | None:
        """The flash query that rides an ingestion request of this many of
        the session's tokens, if any: the first registered that fits."""
        if not self.book.rpc.engine_orders or not self.book.config.flash_with_ingest:
            return None  # without the engine's ordering, flash work waits for idle time
        for fq in session.flash.values():
            if self.book.may_evaluate(session, data_tokens + len(fq.token_ids)):
                return fq
        return None

    async def ride(
        self, session: Session, prompt_ids: list[int], since: float
    ) -> RequestOutput | None:
        """Send the session's ingestion request ``prompt_ids`` (its newest
        version, whole) with a flash question riding it. Returns the first
        output: the engine has then computed and pinned the data; the answer
        is finished in the background and cached like an evaluation's. None
        when no flash query rides (send a plain append)."""
        fq = self._rider(session, len(prompt_ids))
        if fq is None:
            return None
        version, key = session.log_version, session.key
        assert session.length_at(version) == len(prompt_ids)
        session.flash_rides[fq.id] = version
        session.flash_dirty.discard(fq.id)  # an older version's evaluation: superseded
        params = self.book.params(fq, RequestOutputKind.CUMULATIVE)
        first: asyncio.Future[RequestOutput] = asyncio.get_running_loop().create_future()

        async def answer() -> None:
            out = None
            try:
                async for out in self.book.rpc.generate(
                    key, prompt_ids + fq.token_ids, params, Op.APPEND, since, len(prompt_ids)
                ):
                    if not first.done():
                        first.set_result(out)
            except Exception as exc:
                if not first.done():
                    first.set_exception(exc)
                return  # the next version retries
            finally:
                if not first.done():  # cancelled (shutdown) before its first output
                    first.cancel()
            if out is not None and out.finished:
                metrics.FLASH_WITH_INGEST.inc()
                self.book.store(session, fq, version, key, out.outputs[0])

        task = asyncio.create_task(answer())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            return await first
        except asyncio.CancelledError:
            task.cancel()  # aborts the request
            raise
        except InvalidInputError:
            # The engine refused the flash query's parameters: ingestion
            # must not fail for it; it is evaluated on its own.
            session.flash_rides.pop(fq.id, None)
            return None

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
