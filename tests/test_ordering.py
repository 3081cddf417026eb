"""Concurrent appends keep their order and are coalesced."""

from __future__ import annotations

import asyncio
import random

import pytest

from helpers import greedy, reference

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_concurrent_appends_ordered_and_coalesced(engine, stock):
    tok = engine.tokenizer
    session = await engine.create_session("ticks:\n")
    base = list(session.tokens)
    texts = [f"09:30:{i:02d} {1650 + i * 0.25:.2f} {i % 7 + 1}\n" for i in range(50)]
    rnd = random.Random(3)

    async def send(i: int) -> int:
        # Spread over time so appends keep arriving while earlier ones are
        # being ingested.
        await asyncio.sleep(i * 0.004 + rnd.random() * 0.002)
        return await engine.append(session.id, texts[i])

    versions = await asyncio.gather(*(send(i) for i in range(50)))
    assert sorted(versions) == list(range(1, 51))
    await engine.wait_ingested(session.id, 50)
    expected = base + [t for text in texts for t in tok.encode(text, add_special_tokens=False)]
    assert session.tokens == expected
    assert tok.decode(session.tokens[len(base):]) == "".join(texts)
    stats = engine.get_session(session.id)
    assert 1 <= stats.ingest_requests < 50
    # Coalesced ingestion still computed each token exactly once.
    assert stats.ingest_computed_tokens == len(expected)
    result = await engine.query(session.id, "last?", greedy())
    assert result.token_ids == await reference(
        stock, expected + tok.encode("last?", add_special_tokens=False)
    )
