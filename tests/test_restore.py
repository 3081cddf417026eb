"""Restart recovery through the engine API: a second ``StatefulEngine`` over
the same vLLM engine plays the restarted server. It reads the store the
first one wrote and brings every live session back: same ids, token (by
hash), versions, TTL, tenant and flash queries, KV rebuilt in the background,
answers token-for-token those of stock vLLM on the same tokens.

(The kill -9 of a real server is tests/server/test_http_restart.py.)
"""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from helpers import greedy, reference, session_api
from vllm_stateful.engine.session import SessionState, token_hash
from vllm_stateful.errors import SessionRestoringError

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_sessions_come_back_after_a_restart(engine, stock, tmp_path):
    path = tmp_path / "sessions.sqlite3"
    before = {}
    async with session_api(engine, store=str(path)) as first:
        s1 = await first.create_session("Ticks: EURUSD 1.0841 1.0843", session_id="s1", ttl_s=3600)
        # A burst of appends, all acknowledged (durable) before it returns.
        versions = await asyncio.gather(*(first.append("s1", f" tick {i} 1.08{i}") for i in range(12)))
        assert sorted(versions) == list(range(1, 13))
        await first.register_flash("s1", " last?", greedy(4), flash_id="last", max_staleness_ms=50)
        s2 = await first.create_session([1, 5, 6, 7], session_id="s2", tenant="acme")
        await first.append("s2", [8, 9])
        await first.create_session("gone soon", session_id="s3", ttl_s=60)
        for sid in ("s1", "s2"):
            answer = await first.query(sid, " What now?", greedy(6), consistency="latest")
            session = first.sessions[sid]
            before[sid] = (list(session.tokens), list(session.lengths), session.token_hash, answer.token_ids)
        tokens = {"s1": s1.access_token, "s2": s2.access_token}
    # s3 was last used two minutes ago: it expired while the server was down.
    with sqlite3.connect(path) as db:
        db.execute("UPDATE sessions SET last_used = last_used - 120 WHERE id = 's3'")

    async with session_api(engine, store=str(path)) as second:
        plan = await second.restore()
        assert [s.id for s in plan.restoring] == ["s2", "s1"]  # smallest first
        assert plan.expired == ["s3"] and plan.refused == {}
        # Registered at once; nothing is ingested before the rebuild runs.
        s1 = second.sessions["s1"]
        assert s1.state is SessionState.RESTORING and s1.ingested_version == -1
        with pytest.raises(SessionRestoringError) as err:
            await second.query("s1", " What now?", greedy(6), consistency="available")
        assert err.value.retry_after_s >= 1
        for sid in ("s1", "s2"):
            # "ingested" waits for the versions the session had when it stopped.
            answer = await second.query(sid, " What now?", greedy(6))
            session = second.sessions[sid]
            tokens_, lengths, hash_, answered = before[sid]
            assert (session.tokens, session.lengths, session.token_hash) == (tokens_, lengths, hash_)
            assert session.state is SessionState.ACTIVE
            assert answer.version == len(lengths) - 1
            assert answer.token_ids == answered
            question = second.encode(" What now?")
            assert answer.token_ids == await reference(stock, tokens_ + question, 6)
        assert second.sessions["s1"].token_hash == token_hash(tokens["s1"])
        assert second.sessions["s2"].tenant == "acme" and second.sessions["s1"].ttl_s == 3600
        [(fq, _)] = second.list_flash("s1")
        assert (fq.id, fq.prompt, fq.max_staleness_ms, fq.params.max_tokens) == ("last", " last?", 50, 4)
        assert "s3" not in second.sessions
        # Closing deletes it from the store; the rest stays.
        await second.close_session("s2")
        assert [s.id for s in second.journal.store.load()] == ["s1"]
