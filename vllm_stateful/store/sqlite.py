"""The session store: SQLite in WAL mode, written by one thread with group
commit (``group_commit.py``).

Every write is queued and returns an ``asyncio.Future`` that completes once
the write is durable. The writer thread takes everything queued, applies it
in one transaction and commits once, so concurrent appends share one fsync
(``sync="group"``). ``sync="each"`` commits every write alone (one fsync per
append; for comparison), ``sync="os"`` commits without fsync (SQLite
``synchronous=NORMAL`` in WAL mode): a write then survives a crash of the
server process but not of the machine.

Writes are applied in the order they were queued, so an append queued after
a create, or a delete queued after an append, lands in that order.

Each append is a row at its version; version 0 is the prefix. A slide
(``overflow="slide"``) deletes the rows of the appends it dropped and records
``first_version``, the oldest version kept: the log is then row 0 (the
prefix) followed by the rows from ``first_version`` on. Columns added after
the first release are added to an older file when it is opened
(``_MIGRATIONS``), with defaults that mean "never slid".
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import sqlite3
from array import array
from pathlib import Path

from vllm_stateful.store.group_commit import GroupCommit
from vllm_stateful.store.records import StoredFlash, StoredSession

SYNC_MODES = ("group", "each", "os")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, key TEXT NOT NULL, token_hash TEXT NOT NULL, tenant TEXT NOT NULL,
    ttl_s REAL, created_at REAL NOT NULL, last_used REAL NOT NULL);
CREATE TABLE IF NOT EXISTS appends (
    session_id TEXT NOT NULL, version INTEGER NOT NULL, tokens BLOB NOT NULL,
    PRIMARY KEY (session_id, version)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flash (
    session_id TEXT NOT NULL, flash_id TEXT NOT NULL, spec TEXT NOT NULL,
    PRIMARY KEY (session_id, flash_id));  -- rowid: registration order
"""

# Columns of ``sessions`` added since the first release: (name, declaration).
# An older file gets them (ALTER TABLE ADD COLUMN) when it is opened.
_MIGRATIONS = (
    ("overflow", "TEXT NOT NULL DEFAULT 'reject'"),
    ("max_tokens", "INTEGER"),
    ("first_version", "INTEGER NOT NULL DEFAULT 0"),
    ("dropped_tokens", "INTEGER NOT NULL DEFAULT 0"),
    ("slides", "INTEGER NOT NULL DEFAULT 0"),
)
_COLUMNS = (
    "id, key, token_hash, tenant, ttl_s, created_at, last_used, "
    "overflow, max_tokens, first_version, dropped_tokens, slides"
)


class StoreError(RuntimeError):
    """The store cannot be opened (locked by another server, or written by
    another model)."""


def _pack(tokens: list[int]) -> bytes:
    return array("i", tokens).tobytes()


def _unpack(blob: bytes) -> list[int]:
    out = array("i")
    out.frombytes(blob)
    return out.tolist()


class SessionStore:
    def __init__(self, path: str | os.PathLike, sync: str = "group", model: str = ""):
        if sync not in SYNC_MODES:
            raise ValueError(f"store sync must be one of {SYNC_MODES}, got {sync!r}")
        self.path = Path(path)
        self.sync = sync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.path)
        self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute(f"PRAGMA synchronous={'NORMAL' if sync == 'os' else 'FULL'}")
            self._conn.executescript(_SCHEMA)
            self._migrate()
            self._check_model(model)
        except BaseException:
            self._conn.close()
            os.close(self._lock)
            raise
        self._writer = GroupCommit(self._conn, each=sync == "each")

    def _migrate(self) -> None:
        """Add the columns an older file lacks (existing rows get the
        defaults: a ``reject`` session that never slid)."""
        have = {row[1] for row in self._conn.execute("PRAGMA table_info(sessions)")}
        for name, declaration in _MIGRATIONS:
            if name not in have:
                self._conn.execute(f"ALTER TABLE sessions ADD COLUMN {name} {declaration}")

    def _check_model(self, model: str) -> None:
        """Token ids only mean something to the model that made them."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'model'").fetchone()
        count = self._conn.execute("SELECT count(*) FROM sessions").fetchone()[0]
        if row is not None and row[0] != model and count:
            raise StoreError(
                f"the session store {self.path} holds {count} sessions of model "
                f"'{row[0]}', not '{model}': serve that model, or give this server its "
                f"own store (VLLM_STATEFUL_STORE)"
            )
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('model', ?)", (model,))

    # -------------------------------------------------------------------- reads

    def load(self) -> list[StoredSession]:
        """Every stored session (call before the first write)."""
        appends: dict[str, list[list[int]]] = {}
        for sid, _, blob in self._conn.execute(
            "SELECT session_id, version, tokens FROM appends ORDER BY session_id, version"
        ):
            appends.setdefault(sid, []).append(_unpack(blob))
        flash: dict[str, list[StoredFlash]] = {}
        for sid, spec in self._conn.execute("SELECT session_id, spec FROM flash ORDER BY rowid"):
            flash.setdefault(sid, []).append(StoredFlash(**json.loads(spec)))
        out = []
        for (
            sid, key, token_hash, tenant, ttl_s, created_at, last_used,
            overflow, max_tokens, first_version, dropped_tokens, slides,
        ) in self._conn.execute(f"SELECT {_COLUMNS} FROM sessions"):  # fmt: skip
            tokens: list[int] = []
            lengths: list[int] = []
            for part in appends.get(sid, []):
                tokens.extend(part)
                lengths.append(len(tokens))
            if not lengths:
                continue  # cannot happen: a session is written with its prefix
            prefix_len = None
            if first_version > 0:
                # Row 0 is the prefix, no longer a version of its own.
                prefix_len = lengths.pop(0)
            out.append(StoredSession(
                id=sid, key=key, token_hash=token_hash, tenant=tenant, ttl_s=ttl_s,
                created_at=created_at, last_used=last_used, tokens=tokens,
                lengths=lengths, flash=flash.get(sid, []), overflow=overflow,
                max_tokens=max_tokens, first_version=first_version, prefix_len=prefix_len,
                dropped_tokens=dropped_tokens, slides=slides,
            ))  # fmt: skip
        return out

    # ------------------------------------------------------------------- writes

    def create(self, s: StoredSession) -> asyncio.Future:
        # A session is recorded before it can slide.
        assert s.first_version == 0, "create writes a log that never slid"

        def write(db: sqlite3.Connection) -> None:
            _delete(db, s.id)  # a reused id starts afresh
            db.execute(
                f"INSERT INTO sessions ({_COLUMNS}) VALUES ({', '.join('?' * 12)})",
                (s.id, s.key, s.token_hash, s.tenant, s.ttl_s, s.created_at, s.last_used,
                 s.overflow, s.max_tokens, 0, s.dropped_tokens, s.slides),
            )  # fmt: skip
            start = 0
            for version, end in enumerate(s.lengths):
                db.execute(
                    "INSERT INTO appends VALUES (?, ?, ?)", (s.id, version, _pack(s.tokens[start:end]))
                )
                start = end
            for fq in s.flash:
                _put_flash(db, s.id, fq)

        return self._writer.submit(write)

    def append(self, session_id: str, version: int, tokens: list[int], now: float) -> asyncio.Future:
        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT INTO appends VALUES (?, ?, ?)", (session_id, version, _pack(tokens)))
            db.execute("UPDATE sessions SET last_used = ? WHERE id = ?", (now, session_id))

        return self._writer.submit(write)

    def slid(
        self, session_id: str, key: str, first_version: int, dropped_tokens: int, slides: int
    ) -> asyncio.Future:
        """A slide: the appends before ``first_version`` are gone (the
        prefix, row 0, stays), the session's key is the window's."""

        def write(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM appends WHERE session_id = ? AND version > 0 AND version < ?",
                (session_id, first_version),
            )
            db.execute(
                "UPDATE sessions SET key = ?, first_version = ?, dropped_tokens = ?, slides = ? "
                "WHERE id = ?",
                (key, first_version, dropped_tokens, slides, session_id),
            )

        return self._writer.submit(write)

    def touch(self, last_used: dict[str, float]) -> asyncio.Future:
        def write(db: sqlite3.Connection) -> None:
            db.executemany(
                "UPDATE sessions SET last_used = ? WHERE id = ?",
                [(t, sid) for sid, t in last_used.items()],
            )

        return self._writer.submit(write)

    def put_flash(self, session_id: str, fq: StoredFlash) -> asyncio.Future:
        return self._writer.submit(lambda db: _put_flash(db, session_id, fq))

    def drop_flash(self, session_id: str, flash_id: str) -> asyncio.Future:
        return self._writer.submit(lambda db: db.execute(
            "DELETE FROM flash WHERE session_id = ? AND flash_id = ?", (session_id, flash_id)
        ))  # fmt: skip

    def delete(self, session_id: str) -> asyncio.Future:
        return self._writer.submit(lambda db: _delete(db, session_id))

    def close(self) -> None:
        """Finish the queued writes and close the file."""
        self._writer.close()
        self._conn.close()
        os.close(self._lock)

def _put_flash(db: sqlite3.Connection, session_id: str, fq: StoredFlash) -> None:
    spec = json.dumps({
        "id": fq.id, "prompt": fq.prompt, "sampling": fq.sampling,
        "only_changed": fq.only_changed, "max_staleness_ms": fq.max_staleness_ms,
    })  # fmt: skip
    db.execute("INSERT OR REPLACE INTO flash VALUES (?, ?, ?)", (session_id, fq.id, spec))


def _delete(db: sqlite3.Connection, session_id: str) -> None:
    for table, column in (("sessions", "id"), ("appends", "session_id"), ("flash", "session_id")):
        db.execute(f"DELETE FROM {table} WHERE {column} = ?", (session_id,))


def _lock(path: Path) -> int:
    """An exclusive lock next to the file, held while the server runs (the
    OS drops it when the process dies, even on kill -9)."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"the session store {path} is in use by another server; give each server its "
            f"own store (VLLM_STATEFUL_STORE)"
        ) from None
    return fd
