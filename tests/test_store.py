"""The session store on its own (no engine): what is written is read back,
in order; concurrent writes share a commit; one failing write fails alone;
a store is never shared by two servers or two models."""

from __future__ import annotations

import asyncio
import sqlite3
import threading

import pytest

from vllm_stateful.store import SessionStore, StoredFlash, StoredSession, StoreError

pytestmark = pytest.mark.asyncio


def record(sid: str, tokens=(1, 2, 3), flash=()) -> StoredSession:
    return StoredSession(
        id=sid, key="k-" + sid, token_hash="h-" + sid, tenant="t", ttl_s=60.0, created_at=100.0,
        last_used=200.0, tokens=list(tokens), lengths=[len(tokens)], flash=list(flash),
    )  # fmt: skip


class Commits:
    """Counts the store's commits (a trace of the statements it runs)."""

    def __init__(self, store: SessionStore):
        self.n = 0
        store._conn.set_trace_callback(self._trace)

    def _trace(self, sql: str) -> None:
        self.n += sql == "COMMIT"


async def blocked(store: SessionStore) -> tuple[threading.Event, asyncio.Future]:
    """A write that holds the writer thread until the event is set, so the
    writes queued meanwhile are all waiting when it is released."""
    go, running = threading.Event(), threading.Event()

    def write(db: sqlite3.Connection) -> None:
        running.set()
        go.wait(30)

    future = store._writer.submit(write)
    await asyncio.to_thread(running.wait, 30)
    return go, future


async def test_written_sessions_are_read_back(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = SessionStore(path, model="m")
    flash = StoredFlash(id="f", prompt=" q", sampling={"max_tokens": 4, "temperature": 0.0})
    await store.create(record("a", flash=[flash]))
    await store.append("a", 1, [4, 5], now=300.0)
    await store.append("a", 2, [6], now=301.0)
    await store.put_flash("a", StoredFlash(id="g", prompt=[7, 8], sampling={"seed": 3}))
    await store.drop_flash("a", "f")
    await store.create(record("b", tokens=(9,)))
    await store.touch({"b": 400.0})
    await store.create(record("c"))
    await store.delete("c")
    store.close()

    loaded = {s.id: s for s in SessionStore(path, model="m").load()}
    assert sorted(loaded) == ["a", "b"]
    a = loaded["a"]
    assert (a.tokens, a.lengths, a.version) == ([1, 2, 3, 4, 5, 6], [3, 5, 6], 2)
    assert (a.token_hash, a.tenant, a.ttl_s, a.created_at, a.last_used) == ("h-a", "t", 60.0, 100.0, 301.0)
    assert a.flash == [StoredFlash(id="g", prompt=[7, 8], sampling={"seed": 3})]
    assert (loaded["b"].tokens, loaded["b"].last_used) == ([9], 400.0)


async def test_a_reused_id_starts_afresh(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite3")
    await store.create(record("a"))
    await store.append("a", 1, [4], now=1.0)
    store.delete("a")
    await store.create(record("a", tokens=(7, 7)))
    [a] = store.load()
    assert (a.tokens, a.lengths) == ([7, 7], [2])
    store.close()


@pytest.mark.parametrize("sync, commits", [("group", 2), ("os", 2), ("each", 1 + 50)])
async def test_queued_appends_share_one_commit(tmp_path, sync, commits):
    store = SessionStore(tmp_path / "s.sqlite3", sync=sync)
    await store.create(record("a"))
    count = Commits(store)
    go, first = await blocked(store)
    appends = [store.append("a", v, [v], now=float(v)) for v in range(1, 51)]
    go.set()
    await asyncio.gather(first, *appends)
    assert count.n == commits
    [a] = store.load()
    assert a.lengths == list(range(3, 54))
    store.close()


async def test_a_failing_write_fails_alone(tmp_path):
    store = SessionStore(tmp_path / "s.sqlite3")
    await store.create(record("a"))
    go, first = await blocked(store)
    ok1 = store.append("a", 1, [4], now=1.0)
    dup = store.append("a", 1, [5], now=1.0)  # version 1 exists: refused by the key
    ok2 = store.append("a", 2, [6], now=1.0)
    go.set()
    results = await asyncio.gather(first, ok1, dup, ok2, return_exceptions=True)
    assert results[:2] == [None, None] and results[3] is None
    assert isinstance(results[2], sqlite3.IntegrityError)
    [a] = store.load()
    assert a.tokens == [1, 2, 3, 4, 6]
    store.close()


async def test_two_servers_never_share_a_store(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = SessionStore(path)
    with pytest.raises(StoreError, match="in use by another server"):
        SessionStore(path)
    store.close()
    SessionStore(path).close()  # the lock is gone with its holder


async def test_a_store_of_another_model_is_refused(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = SessionStore(path, model="one")
    await store.create(record("a"))
    store.close()
    with pytest.raises(StoreError, match="1 sessions of model 'one', not 'two'"):
        SessionStore(path, model="two")
    SessionStore(path, model="one").close()
