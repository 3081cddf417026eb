"""Session answers equal stock vLLM token for token (tiny model, float32)."""

from __future__ import annotations

import random

import pytest

from helpers import greedy, reference

pytestmark = pytest.mark.asyncio(loop_scope="session")

INTERLEAVINGS = 24


def random_tokens(rnd: random.Random, n: int, vocab: int) -> list[int]:
    return [rnd.randrange(2, vocab) for _ in range(n)]


@pytest.mark.parametrize("seed", range(INTERLEAVINGS))
async def test_random_interleaving_matches_stock(engine, stock, seed):
    rnd = random.Random(seed)
    vocab = engine.vocab_size
    block = engine.block_size
    session = await engine.create_session(random_tokens(rnd, rnd.randrange(0, 3 * block), vocab))
    checked = 0
    for _ in range(8):
        op = rnd.random()
        if op < 0.5:
            # Sizes from 1 token to several blocks; some land exactly on a
            # block boundary.
            n = rnd.choice([1, 2, block - 1, block, block + 1, rnd.randrange(1, 5 * block)])
            await engine.append(session.id, random_tokens(rnd, n, vocab))
            if rnd.random() < 0.5:
                await engine.wait_ingested(session.id)
        else:
            question = random_tokens(rnd, rnd.randrange(1, block + 8), vocab)
            consistency = rnd.choice(["ingested", "latest"])
            result = await engine.query(session.id, question, greedy(), consistency=consistency)
            if consistency == "latest":
                assert result.version == session.version
            full = session.tokens_at(result.version) + question
            assert result.token_ids == await reference(stock, full)
            assert result.computed_tokens == len(question)
            checked += 1
    # Every interleaving ends with a query on the latest data.
    question = random_tokens(rnd, 5, vocab)
    result = await engine.query(session.id, question, greedy(), consistency="latest")
    full = session.tokens_at(session.version) + question
    assert result.token_ids == await reference(stock, full)
    assert result.computed_tokens == len(question)


async def test_text_pieces_and_commit(engine, stock):
    tok = engine.tokenizer
    session = await engine.create_session("09:30:00 1651.25 3\n")
    await engine.append(session.id, "09:30:01 1651.50 1\n")
    result = await engine.query(session.id, "last price?", greedy(6), consistency="latest")
    question = tok.encode("last price?", add_special_tokens=False)
    full = tok.encode("09:30:00 1651.25 3\n") + tok.encode(
        "09:30:01 1651.50 1\n", add_special_tokens=False
    )
    assert session.tokens_at(result.version) == full
    assert result.token_ids == await reference(stock, full + question, 6)

    before = session.version
    committed = await engine.query(session.id, "and now?", greedy(4), commit=True)
    assert committed.committed_version == before + 1
    q2 = tok.encode("and now?", add_special_tokens=False)
    assert session.tokens == full + q2 + committed.token_ids
    # The committed turn is ingested and pinned like any append.
    await engine.wait_ingested(session.id, committed.committed_version)
    follow = await engine.query(session.id, [7, 8, 9], greedy())
    assert follow.computed_tokens == 3
    assert follow.token_ids == await reference(stock, session.tokens + [7, 8, 9])


async def test_query_does_not_change_session(engine):
    session = await engine.create_session([5] * 40)
    tokens, version = list(session.tokens), session.version
    for _ in range(3):
        await engine.query(session.id, [9, 10, 11], greedy())
    assert session.tokens == tokens and session.version == version
    # Token ids are taken verbatim (no BOS is added).
    assert engine.get_session(session.id).pinned_tokens == 40


async def test_empty_session_then_appends(engine, stock):
    session = await engine.create_session([])
    assert session.tokens == [] and session.ingested_version == 0
    first = await engine.query(session.id, [3, 4, 5], greedy())
    assert first.token_ids == await reference(stock, [3, 4, 5])
    await engine.append(session.id, [8] * 40)
    result = await engine.query(session.id, [3, 4, 5], greedy(), consistency="latest")
    assert result.computed_tokens == 3
    assert result.token_ids == await reference(stock, [8] * 40 + [3, 4, 5])
