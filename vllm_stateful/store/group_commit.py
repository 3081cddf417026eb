"""Group commit: one thread applies the store's queued writes, as many as
are queued at once in one transaction, so concurrent appends share one
commit (one fsync). Each write's ``asyncio.Future`` completes once it is
durable; writes are applied in the order they were queued.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from typing import Callable

logger = logging.getLogger(f"vllm.{__name__}")

# At most this many writes share one commit.
MAX_BATCH = 1024

Write = Callable[[sqlite3.Connection], None]


class GroupCommit:
    """``each=True`` commits every write alone (one fsync per write)."""

    def __init__(self, conn: sqlite3.Connection, each: bool = False):
        self._conn = conn
        self._each = each
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vllm-stateful-store", daemon=True)
        self._thread.start()

    def submit(self, write: Write) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(_log_failure)
        self._queue.put((write, future, loop))
        return future

    def close(self) -> None:
        """Finish the queued writes (the thread then ends)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch, stop = [first], False
            while not self._each and len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list) -> None:
        try:
            self._transaction([w for w, _, _ in batch])
            errors: list[BaseException | None] = [None] * len(batch)
        except Exception:  # noqa: BLE001 - find which write failed: one at a time
            errors = []
            for write, _, _ in batch:
                try:
                    self._transaction([write])
                    errors.append(None)
                except Exception as exc:  # noqa: BLE001 - handed to its caller
                    errors.append(exc)
        for (_, future, loop), error in zip(batch, errors):
            loop.call_soon_threadsafe(_settle, future, error)

    def _transaction(self, writes: list[Write]) -> None:
        db = self._conn
        db.execute("BEGIN")
        try:
            for write in writes:
                write(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")  # the one fsync of the batch (unless sync="os")


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _log_failure(future: asyncio.Future) -> None:
    # Also marks the exception retrieved for writes nobody awaits.
    if not future.cancelled() and future.exception() is not None:
        logger.error("session store write failed: %r", future.exception())
