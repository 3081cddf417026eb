"""Concurrent appends keep their order and are coalesced."""

from __future__ import annotations

import asyncio
import math

import pytest

from helpers import RpcFaults, greedy, reference
from vllm_stateful.protocol import Op

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_concurrent_appends_ordered_and_coalesced(engine, stock, monkeypatch):
    tok = engine.tokenizer
    session = await engine.create_session("ticks:\n")
    base = list(session.tokens)
    texts = [f"09:30:{i:02d} {1650 + i * 0.25:.2f} {i % 7 + 1}\n" for i in range(50)]
    faults = RpcFaults(engine)
    monkeypatch.setattr(engine.rpc, "generate", faults.generate)
    faults.hold_op = Op.APPEND

    # The first append's ingestion is held in flight while the other 49
    # arrive together, so they must pile up behind it.
    assert await engine.append(session.id, texts[0]) == 1
    await asyncio.wait_for(faults.arrived.wait(), 60)
    first_len = session.lengths[1]
    # Tasks start in creation order: versions follow the list order.
    versions = await asyncio.gather(*(engine.append(session.id, t) for t in texts[1:]))
    assert versions == list(range(2, 51))
    faults.gate.set()
    await engine.wait_ingested(session.id, 50)

    expected = base + [t for text in texts for t in tok.encode(text, add_special_tokens=False)]
    assert session.tokens == expected
    assert tok.decode(session.tokens[len(base):]) == "".join(texts)
    stats = engine.get_session(session.id)
    # One request for the prefix, one for version 1, then the 49 piled-up
    # appends coalesced into as few requests as the ingest chunk size allows.
    chunk = engine.config.ingest_chunk_tokens
    assert first_len - len(base) <= chunk
    assert stats.ingest_requests == 1 + 1 + math.ceil((len(expected) - first_len) / chunk)
    # Coalesced ingestion still computed each token exactly once.
    assert stats.ingest_computed_tokens == len(expected)
    result = await engine.query(session.id, "last?", greedy())
    assert result.token_ids == await reference(
        stock, expected + tok.encode("last?", add_special_tokens=False)
    )
