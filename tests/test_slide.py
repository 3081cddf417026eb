"""The context-overflow policy ``slide``: past its ``max_tokens`` a session
drops its oldest appends, keeps its prefix, and answers on the window exactly
as stock vLLM does on the window's tokens. Versions keep counting; questions
asked while the window is built read the previous version; pins, budget and
the store agree afterwards. ``reject`` sessions refuse as they always did.

Every expected figure below is derived by hand from the appended lists (the
comments give the arithmetic), not from the code under test.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3

import pytest

from conftest import BLOCK_SIZE, MAX_MODEL_LEN
from helpers import RpcFaults, greedy, reference, session_api, until
from test_lifecycle import baseline, drain, settled
from vllm_stateful.engine.session import SessionState
from vllm_stateful.errors import (
    AppendTooLargeError,
    BudgetExceededError,
    ContextLengthError,
    IngestionFailedError,
    InvalidInputError,
    SlideInProgressError,
)
from vllm_stateful.protocol import Op
from vllm_stateful.store import SessionStore, StoredSession

pytestmark = pytest.mark.asyncio(loop_scope="session")

LIMIT = 200  # max_tokens of the sessions below; a slide keeps at most 150 (3/4)


def tokens(seed: int, n: int) -> list[int]:
    rnd = random.Random(seed)
    return [rnd.randrange(2, 500) for _ in range(n)]  # the tiny model has 512 ids


def blocks(n: int) -> int:
    return -(-n // BLOCK_SIZE)


async def test_slide_keeps_prefix_and_newest_appends_and_matches_stock(engine, stock):
    free = await baseline(engine)
    prefix = tokens(0, 20)
    a = {v: tokens(v, n) for v, n in {1: 50, 2: 60, 3: 40, 4: 70, 5: 30, 6: 50}.items()}
    question = tokens(99, 7)
    session = await engine.create_session(prefix, overflow="slide", max_tokens=LIMIT)
    events = engine.subscribe(session.id)
    flash_q = tokens(98, 3)
    await engine.register_flash(session.id, flash_q, greedy(), flash_id="f")
    for v in (1, 2, 3):  # 20 + 50 + 60 + 40 = 170 <= 200: no slide
        assert await engine.append(session.id, a[v]) == v
    await engine.wait_ingested(session.id)
    assert engine.get_session(session.id).slides == 0

    # 170 + 70 = 240 > 200: slide. Newest first, within 150: 20 + 70 = 90,
    # + a3 (40) = 130, + a2 (60) = 190 > 150: the window is prefix + a3 + a4.
    assert await engine.append(session.id, a[4]) == 4
    assert await engine.wait_ingested(session.id, 4) == 4
    window = prefix + a[3] + a[4]
    st = engine.get_session(session.id)
    assert (st.version, st.ingested_version, st.pending) == (4, 4, 0)
    assert (st.window_start_version, st.dropped_tokens, st.slides) == (3, 50 + 60, 1)
    assert (st.tokens, st.pinned_tokens, st.max_tokens, st.overflow) == (130, 130, LIMIT, "slide")
    assert st.sliding is False
    assert session.tokens == window
    assert session.tokens_at(3) == prefix + a[3]
    # Flash answers are evaluated again on the window.
    await until(lambda: "f" in session.flash_results and session.flash_results["f"].version == 4)
    assert session.flash_results["f"].token_ids == await reference(stock, window + flash_q)
    hit = await engine.query(session.id, flash_q, greedy())
    assert (hit.flash, hit.version, hit.prompt_tokens) == (True, 4, 130 + 3)
    answer = await engine.query(session.id, question, greedy())
    assert answer.version == 4
    assert answer.token_ids == await reference(stock, window + question)
    # The window's KV is pinned under the session's new key: only the
    # question is computed.
    assert answer.computed_tokens == len(question)

    # 130 + 30 = 160 <= 200: a plain append into the window.
    assert await engine.append(session.id, a[5]) == 5
    answer = await engine.query(session.id, question, greedy(), consistency="latest")
    assert answer.version == 5
    assert answer.token_ids == await reference(stock, window + a[5] + question)

    # 160 + 50 = 210 > 200: slide again. 20 + 50 = 70, + a5 (30) = 100,
    # + a4 (70) = 170 > 150: the window is prefix + a5 + a6.
    assert await engine.append(session.id, a[6]) == 6
    answer = await engine.query(session.id, question, greedy(), consistency="latest")
    window = prefix + a[5] + a[6]
    assert answer.version == 6
    assert answer.token_ids == await reference(stock, window + question)
    st = engine.get_session(session.id)
    assert (st.window_start_version, st.dropped_tokens, st.slides) == (5, 110 + 40 + 70, 2)
    assert (st.version, st.tokens) == (6, 100)

    slid = [e for e in drain(events) if e.type == "slid"]
    assert [(e.version, e.data["window_start_version"], e.data["tokens"]) for e in slid] == [
        (4, 3, 130), (6, 5, 100),
    ]
    assert [e.data["dropped_tokens"] for e in slid] == [110, 110]  # 50+60, then 40+70
    assert [e.data["total_dropped_tokens"] for e in slid] == [110, 220]

    # The slide's CLOSE of the old key is acknowledged after the swap.
    await until(lambda: not session.retiring)
    # The flash query's last evaluation (on version 6) holds blocks while it
    # runs: let it finish before comparing the pool with the baseline.
    await until(lambda: session.flash_results.get("f") and session.flash_results["f"].version == 6)
    await until(lambda: engine.rpc.unfinished() == 0)
    check = await engine.reconcile()
    assert check.agree, check.details
    assert (check.engine_pins, check.api_pinned_tokens, check.skipped) == (1, 100, 0)
    assert check.pinned_blocks == blocks(100)
    await engine.close_session(session.id)
    await settled(engine, free)


async def test_questions_during_the_rebuild_read_the_previous_version(engine, stock, monkeypatch):
    free = await baseline(engine)
    prefix, first, second, big = tokens(10, 16), tokens(11, 90), tokens(12, 60), tokens(13, 80)
    question = tokens(14, 5)
    session = await engine.create_session(prefix, overflow="slide", max_tokens=LIMIT)
    await engine.append(session.id, first)
    await engine.append(session.id, second)
    await engine.wait_ingested(session.id, 2)  # 16 + 90 + 60 = 166, all pinned
    old_key = session.key

    # Hold every ingest request at the gate: the next one is the window's.
    faults = RpcFaults(engine)
    monkeypatch.setattr(engine.rpc, "generate", faults.generate)
    faults.hold_op = Op.APPEND
    # 166 + 80 = 246 > 200. 16 + 80 = 96, + second (60) = 156 > 150: the
    # window is prefix + big, version 3.
    assert await engine.append(session.id, big) == 3
    await asyncio.wait_for(faults.arrived.wait(), 60)
    window_key = session.window.key
    assert window_key != old_key and faults.calls[-1] == (window_key, Op.APPEND)
    st = engine.get_session(session.id)
    assert (st.version, st.ingested_version, st.pending, st.sliding) == (3, 2, 1, True)
    assert (st.window_start_version, st.slides, st.dropped_tokens) == (0, 0, 0)
    assert st.backlog_tokens == 16 + 80  # the window, none of it ingested yet
    # While both logs exist the session holds both in the budget:
    # 166 tokens = 6 blocks, the window's 96 = 3 blocks.
    held = engine.budget.used(n for s in engine.registry.budgeted() for n in s.resident_sizes())
    assert held == (6 + 3) * BLOCK_SIZE
    answer = await engine.query(session.id, question, greedy())
    assert answer.version == 2
    assert answer.token_ids == await reference(stock, prefix + first + second + question)
    assert answer.computed_tokens == len(question)  # still served by the old pin
    check = await engine.reconcile()
    assert check.agree and check.skipped == 1, check.details

    # Appends meanwhile go to the window: 96 + 10 = 106 fits (version 4);
    # 106 + 95 = 201 would overflow it before it is even in place.
    small = tokens(15, 10)
    assert await engine.append(session.id, small) == 4
    with pytest.raises(SlideInProgressError, match="limit of 200 tokens"):
        await engine.append(session.id, tokens(16, 95))
    assert engine.get_session(session.id).version == 4

    faults.gate.set()
    assert await engine.wait_ingested(session.id, 3) >= 3
    assert session.key == window_key
    answer = await engine.query(session.id, question, greedy(), consistency="latest")
    assert answer.version == 4
    assert answer.token_ids == await reference(stock, prefix + big + small + question)
    st = engine.get_session(session.id)
    assert (st.window_start_version, st.dropped_tokens, st.slides, st.sliding) == (3, 150, 1, False)
    await until(lambda: not session.retiring)
    check = await engine.reconcile()
    assert check.agree and check.skipped == 0, check.details
    assert check.engine_pins == 1 and check.api_pinned_tokens == 106
    await engine.close_session(session.id)
    await settled(engine, free)


class HoldLongAppends(RpcFaults):
    """Holds ingest requests whose prompt passes ``tokens`` at the gate:
    the window's first chunk is pinned, its second waits."""

    def __init__(self, engine, tokens: int):
        super().__init__(engine)
        self.tokens = tokens

    def generate(self, key, prompt_ids, params, op, since=None, data_tokens=None):
        self.hold_op = Op.APPEND if op is Op.APPEND and len(prompt_ids) > self.tokens else None
        return super().generate(key, prompt_ids, params, op, since, data_tokens)


async def test_close_during_the_rebuild_releases_both_pins(engine, monkeypatch):
    free = await baseline(engine)
    chunk = engine.config.ingest_chunk_tokens
    assert chunk == 256  # the shared engines' chunk (conftest): the window takes two
    session = await engine.create_session(tokens(40, 40), overflow="slide", max_tokens=600)
    await engine.append(session.id, tokens(41, 400))
    await engine.wait_ingested(session.id, 1)  # 440 pinned (two chunks)
    faults = HoldLongAppends(engine, chunk)
    monkeypatch.setattr(engine.rpc, "generate", faults.generate)
    # 440 + 300 = 740 > 600: 40 + 300 = 340, + 400 > 450 (3/4 of 600): the
    # window is the prefix + this append, ingested as 256 + 84 tokens.
    assert await engine.append(session.id, tokens(42, 300)) == 2
    await asyncio.wait_for(faults.arrived.wait(), 60)
    window = session.window
    assert window.pinned_tokens == chunk and window.key != session.key
    kv = await engine.kv_stats()
    assert kv.pinned_blocks == blocks(440) + blocks(chunk)  # both pins: 14 + 8
    await engine.close_session(session.id)
    assert session.state is SessionState.CLOSED and session.window is None
    assert not session.retiring
    await settled(engine, free)


async def test_a_failed_window_ingest_is_reported_and_retried(engine, stock, monkeypatch):
    free = await baseline(engine)
    prefix, first, big, question = tokens(50, 20), tokens(51, 150), tokens(52, 60), tokens(53, 4)
    session = await engine.create_session(prefix, overflow="slide", max_tokens=LIMIT)
    await engine.append(session.id, first)
    await engine.wait_ingested(session.id, 1)
    old_key = session.key
    faults = RpcFaults(engine)
    monkeypatch.setattr(engine.rpc, "generate", faults.generate)
    faults.fail = lambda key, prompt, op: op is Op.APPEND and key != old_key
    # 170 + 60 = 230 > 200: the window is prefix + big (80 <= 150; + 150 > 150).
    assert await engine.append(session.id, big) == 2
    with pytest.raises(IngestionFailedError, match="injected failure"):
        await engine.wait_ingested(session.id, 2)
    # The session is intact: it answers on version 1, and is still sliding.
    answer = await engine.query(session.id, question, greedy())
    assert answer.version == 1
    assert answer.token_ids == await reference(stock, prefix + first + question)
    assert engine.get_session(session.id).sliding is True
    faults.fail = lambda key, prompt, op: False
    assert await engine.retry_ingest(session.id) == 2
    assert await engine.wait_ingested(session.id, 2) == 2
    answer = await engine.query(session.id, question, greedy())
    assert answer.token_ids == await reference(stock, prefix + big + question)
    assert (session.first_version, session.dropped_tokens) == (2, 150)
    await engine.close_session(session.id)
    await settled(engine, free)


async def test_a_slide_the_budget_cannot_hold_is_refused(engine):
    # 15 blocks of 32: the session pins 11 (340 tokens); its window would
    # need 5 more (140) while both exist: 16 > 15.
    async with session_api(engine, budget_tokens=15 * BLOCK_SIZE, offload=False) as api:
        session = await api.create_session([5] * 40, overflow="slide", max_tokens=400)
        await api.append(session.id, [6] * 300)
        await api.wait_ingested(session.id, 1)
        with pytest.raises(BudgetExceededError):
            await api.append(session.id, [7] * 100)  # 440 > 400: a slide to 140
        assert (session.version, len(session.tokens), session.window) == (1, 340, None)
        assert engine.budget.cost(340) == 11 * BLOCK_SIZE


async def test_reject_refuses_as_before_and_bad_settings_are_400(engine):
    free = await baseline(engine)
    # The default: reject at the model's limit, with the same error as ever.
    plain = await engine.create_session([5] * 100, session_id="plain")
    with pytest.raises(ContextLengthError) as err:
        await engine.append("plain", [6] * (MAX_MODEL_LEN - 100))
    assert err.value.message == (
        f"session 'plain' would hold {MAX_MODEL_LEN} tokens; the model's context window "
        f"(max_model_len) is {MAX_MODEL_LEN}"
    )
    assert (plain.version, len(plain.tokens)) == (0, 100)
    assert engine.get_session("plain").overflow == "reject"
    assert engine.get_session("plain").max_tokens == MAX_MODEL_LEN - 1

    # reject with its own max_tokens: refused past it, session intact.
    capped = await engine.create_session([5] * 50, session_id="capped", max_tokens=LIMIT)
    assert await engine.append("capped", [7] * 150) == 1  # 200: exactly the limit
    with pytest.raises(ContextLengthError, match=f"max_tokens is {LIMIT}"):
        await engine.append("capped", [7])
    assert (capped.version, len(capped.tokens), capped.slides) == (1, 200, 0)

    with pytest.raises(InvalidInputError, match="overflow must be one of reject, slide"):
        await engine.create_session([5], overflow="drop")
    with pytest.raises(InvalidInputError, match="larger than the model allows"):
        await engine.create_session([5], overflow="slide", max_tokens=MAX_MODEL_LEN)
    with pytest.raises(InvalidInputError, match="leaves no room for an append"):
        await engine.create_session([5] * 40, overflow="slide", max_tokens=40)
    assert set(engine.sessions) == {"plain", "capped"}

    # One append larger than any window: 400, naming the limit; intact.
    slide = await engine.create_session([5] * 40, session_id="slide", overflow="slide", max_tokens=LIMIT)
    await engine.append("slide", [8] * 100)
    with pytest.raises(AppendTooLargeError, match=f"limit of {LIMIT} tokens") as err:
        await engine.append("slide", [9] * 161)  # 40 + 161 = 201 > 200
    assert err.value.http_status == 400
    assert (slide.version, len(slide.tokens), slide.slides, slide.window) == (1, 140, 0, None)
    # 40 + 160 = 200 fits alone: a slide to prefix + that append.
    assert await engine.append("slide", [9] * 160) == 2
    await engine.wait_ingested("slide", 2)
    assert slide.tokens == [5] * 40 + [9] * 160 and slide.first_version == 2
    for sid in ("plain", "capped", "slide"):
        await engine.close_session(sid)
    await settled(engine, free)


async def test_a_slid_session_comes_back_after_a_restart(engine, stock, tmp_path):
    path = tmp_path / "sessions.sqlite3"
    prefix, a1, a2, a3, a4 = tokens(20, 30), tokens(21, 80), tokens(22, 50), tokens(23, 40), tokens(24, 9)
    question = tokens(25, 6)
    async with session_api(engine, store=str(path), offload=False) as first:
        await first.create_session(prefix, session_id="s", overflow="slide", max_tokens=LIMIT)
        for part in (a1, a2):
            await first.append("s", part)  # 30 + 80 + 50 = 160
        # 160 + 40 = 200: fits. + 9 = 209 > 200: slide. 30 + 9 = 39, + a3
        # (40) = 79, + a2 (50) = 129, + a1 (80) = 209 > 150: a2, a3, a4 kept.
        await first.append("s", a3)
        assert await first.append("s", a4) == 4
        await first.wait_ingested("s", 4)
        s = first.sessions["s"]
        await until(lambda: not s.retiring)
        assert (s.first_version, s.dropped_tokens, s.slides) == (2, 80, 1)
        key = s.key
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT version FROM appends WHERE session_id = 's' ORDER BY version")
        assert [v for (v,) in rows] == [0, 2, 3, 4]  # the prefix and the appends kept
        assert db.execute("SELECT key FROM sessions").fetchall() == [(key,)]

    async with session_api(engine, store=str(path), offload=False) as second:
        plan = await second.restore()
        assert [x.id for x in plan.restoring] == ["s"]
        answer = await second.query("s", question, greedy())
        s = second.sessions["s"]
        window = prefix + a2 + a3 + a4
        assert (s.tokens, s.lengths) == (window, [80, 120, 129])
        assert (s.first_version, s.prefix_len, s.dropped_tokens, s.slides) == (2, 30, 80, 1)
        assert (s.overflow, s.max_tokens, s.state) == ("slide", LIMIT, SessionState.ACTIVE)
        assert answer.version == 4
        assert answer.token_ids == await reference(stock, window + question)
        # Versions go on from where they were.
        assert await second.append("s", [7, 7, 7]) == 5
        st = second.get_session("s")
        assert (st.window_start_version, st.dropped_tokens, st.version) == (2, 80, 5)


async def test_a_session_stored_past_its_limit_comes_back_as_its_window(engine, stock, tmp_path):
    """The server stopped while a window was being built: the store holds
    the whole log, the overflowing append included. It comes back slid."""
    path = tmp_path / "sessions.sqlite3"
    prefix, a1, a2, a3 = tokens(30, 10), tokens(31, 100), tokens(32, 60), tokens(33, 70)
    log = prefix + a1 + a2 + a3  # 240 > 200
    store = SessionStore(path, model=engine.engine.vllm_config.model_config.model)
    await store.create(StoredSession(
        id="mid", key="k-mid", token_hash="h", tenant="default", ttl_s=None, created_at=1.0,
        last_used=2.0, tokens=log, lengths=[10, 110, 170, 240], overflow="slide", max_tokens=LIMIT,
    ))  # fmt: skip
    store.close()
    # 10 + 70 = 80, + a2 (60) = 140, + a1 (100) = 240 > 150: a2 and a3 kept.
    async with session_api(engine, store=str(path), offload=False) as server:
        await server.restore()
        question = tokens(34, 4)
        answer = await server.query("mid", question, greedy())
        s = server.sessions["mid"]
        assert (s.tokens, s.lengths, s.first_version) == (prefix + a2 + a3, [70, 140], 2)
        assert (s.dropped_tokens, s.slides, answer.version) == (100, 1, 3)
        assert answer.token_ids == await reference(stock, prefix + a2 + a3 + question)
        await server.journal.store.touch({})  # writes land in order: the slide's is in
    store = SessionStore(path, model=engine.engine.vllm_config.model_config.model)
    try:
        [rec] = store.load()
        assert (rec.tokens, rec.lengths, rec.first_version, rec.prefix_len) == (
            prefix + a2 + a3, [70, 140], 2, 10,
        )
        assert (rec.dropped_tokens, rec.slides, rec.version) == (100, 1, 3)
    finally:
        store.close()


async def test_an_older_store_file_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as db:  # the schema before overflow policies
        db.executescript("""
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
            CREATE TABLE sessions (
                id TEXT PRIMARY KEY, key TEXT NOT NULL, token_hash TEXT NOT NULL,
                tenant TEXT NOT NULL, ttl_s REAL, created_at REAL NOT NULL,
                last_used REAL NOT NULL);
            CREATE TABLE appends (
                session_id TEXT NOT NULL, version INTEGER NOT NULL, tokens BLOB NOT NULL,
                PRIMARY KEY (session_id, version)) WITHOUT ROWID;
            CREATE TABLE flash (
                session_id TEXT NOT NULL, flash_id TEXT NOT NULL, spec TEXT NOT NULL,
                PRIMARY KEY (session_id, flash_id));
            INSERT INTO meta VALUES ('model', 'm');
            INSERT INTO sessions VALUES ('old', 'k', 'h', 'default', NULL, 1.0, 2.0);
        """)
        from array import array

        db.execute("INSERT INTO appends VALUES ('old', 0, ?)", (array("i", [1, 2, 3]).tobytes(),))
        db.execute("INSERT INTO appends VALUES ('old', 1, ?)", (array("i", [4, 5]).tobytes(),))
    store = SessionStore(path, model="m")
    try:
        [rec] = store.load()
        assert (rec.id, rec.tokens, rec.lengths, rec.version) == ("old", [1, 2, 3, 4, 5], [3, 5], 1)
        assert (rec.overflow, rec.max_tokens, rec.first_version, rec.prefix_len) == ("reject", None, 0, None)
        assert (rec.dropped_tokens, rec.slides) == (0, 0)
    finally:
        store.close()
