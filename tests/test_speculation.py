"""Speculative decoding (n-gram drafts, batch-size schedule) leaves greedy
answers unchanged: session questions and flash evaluations on a stateful
engine with speculation equal stock vLLM without it, token for token (tiny
model, float32), and questions still compute exactly their own tokens.

The interleavings are those of ``test_exactness.py`` (same generator and
seeds), on fewer seeds and with longer answers, plus streams that repeat
themselves so that drafts are proposed and accepted (checked with vLLM's
own speculative decoding counts), and concurrent questions whose batch
sizes cross the schedule's tiers.
"""

from __future__ import annotations

import asyncio
import os
import random

import pytest

from helpers import greedy, reference
from test_exactness import random_tokens
from vllm_stateful.config import SPECULATION_SCHEDULE

INTERLEAVINGS = 8
ANSWER_TOKENS = 16


@pytest.fixture
async def spec(stateful_spec):
    """The speculative engine; sessions a test leaves open are closed."""
    yield stateful_spec
    for session_id in list(stateful_spec.sessions):
        await stateful_spec.close_session(session_id)


def repeating(rnd: random.Random, n: int, vocab: int) -> list[int]:
    """``n`` tokens of a short random pattern repeated: a stream whose
    continuation can be copied from itself."""
    pattern = random_tokens(rnd, rnd.randrange(3, 9), vocab)
    return (pattern * (n // len(pattern) + 1))[:n]


async def check_query(engine, stock, session, question, consistency="ingested"):
    result = await engine.query(
        session.id, question, greedy(ANSWER_TOKENS), consistency=consistency
    )
    if consistency == "latest":
        assert result.version == session.version
    full = session.tokens_at(result.version) + question
    assert result.token_ids == await reference(stock, full, ANSWER_TOKENS)
    assert result.computed_tokens == len(question)
    return result


def from_stream(rnd: random.Random, n: int, vocab: int, tokens: list[int]) -> list[int]:
    """A question copied from the session's last tokens (random ones if it
    has none yet): its end matches the stream, so drafts are proposed."""
    take = tokens[-rnd.randrange(2, 12):]
    return take or random_tokens(rnd, n, vocab)


async def interleaving(engine, stock, seed: int, data, ask) -> None:
    """``test_exactness``'s random interleaving of appends and questions,
    with ``data(rnd, n, vocab)`` making the appended tokens and
    ``ask(rnd, n, vocab, tokens)`` the questions."""
    rnd = random.Random(seed)
    vocab, block = engine.vocab_size, engine.block_size
    session = await engine.create_session(data(rnd, rnd.randrange(0, 3 * block), vocab))
    for _ in range(8):
        if rnd.random() < 0.5:
            n = rnd.choice([1, 2, block - 1, block, block + 1, rnd.randrange(1, 5 * block)])
            await engine.append(session.id, data(rnd, n, vocab))
            if rnd.random() < 0.5:
                await engine.wait_ingested(session.id)
        else:
            question = ask(rnd, rnd.randrange(1, block + 8), vocab, session.tokens)
            await check_query(
                engine, stock, session, question, rnd.choice(["ingested", "latest"])
            )
    await check_query(engine, stock, session, ask(rnd, 5, vocab, session.tokens), "latest")


@pytest.mark.parametrize("seed", range(INTERLEAVINGS))
async def test_random_interleaving_matches_stock(spec, stock, seed):
    def ask(rnd, n, vocab, _tokens):
        return random_tokens(rnd, n, vocab)

    # The same random calls in the same order: test_exactness's interleavings.
    await interleaving(spec, stock, seed, random_tokens, ask)


@pytest.mark.parametrize("seed", range(INTERLEAVINGS))
async def test_copy_heavy_interleaving_matches_stock(spec, stock, seed):
    before = dict(spec.spec_decode_totals)
    await interleaving(spec, stock, 1000 + seed, repeating, from_stream)
    after = spec.spec_decode_totals
    # Drafts were proposed from the session's own tokens and verified.
    assert after["draft_tokens"] > before["draft_tokens"]


async def test_drafts_accepted_on_a_copying_answer(spec, stock):
    """An answer that repeats itself: drafts copied from its first cycle
    are accepted (steps produce several tokens), and it is still stock's."""
    # With the tiny model (fixed seed, float32), the greedy answer to this
    # stream opens with a 6-token cycle repeated three times; found by
    # trying random patterns, and checked below against stock.
    pattern = [224, 216, 37, 125, 48, 284]
    cycle = [302, 349, 109, 191, 69, 11]
    session = await spec.create_session(pattern * 30)
    before = dict(spec.spec_decode_totals)
    result = await check_query(spec, stock, session, pattern[:3])
    assert result.token_ids[:12] == cycle * 2
    after = spec.spec_decode_totals
    assert after["accepted_tokens"] - before["accepted_tokens"] >= 4


def _torch_threads(worker) -> int:
    import torch

    return torch.get_num_threads()


async def test_drafts_keep_the_engine_threads(spec, stateful):
    """vLLM's n-gram proposer drafts with a numba kernel; under numba's
    OpenMP layer that leaves the worker's torch on one thread from the first
    proposal on (``vllm_stateful/numba_threads.py``). With the setting the
    plugin makes, the speculative engine's worker keeps as many threads as
    the engine without speculation, after drafts were proposed."""
    session = await spec.create_session([224, 216, 37, 125, 48, 284] * 30)
    before = dict(spec.spec_decode_totals)
    await spec.query(session.id, [224, 216, 37], greedy(ANSWER_TOKENS))
    assert spec.spec_decode_totals["draft_tokens"] > before["draft_tokens"]
    assert os.environ.get("NUMBA_THREADING_LAYER") == "workqueue"
    reference = await stateful.engine.collective_rpc(_torch_threads)
    if reference[0] < 2:
        pytest.skip("the engine runs one thread here: nothing to lose")
    assert await spec.engine.collective_rpc(_torch_threads) == reference


async def test_concurrent_questions_cross_the_schedule(spec, stock):
    """Questions from up to 10 sessions at once: the batch goes through
    every tier of the schedule (drafts 4, 2, 1, 0 per request) while
    answers are decoded, and each answer is still stock's."""
    assert max(end for _, end, _ in SPECULATION_SCHEDULE[:-1]) < 10
    rnd = random.Random(99)
    vocab = spec.vocab_size
    sessions = [await spec.create_session(repeating(rnd, 70 + 9 * i, vocab)) for i in range(10)]
    for n in (10, 6, 3, 1):
        questions = [random_tokens(rnd, rnd.randrange(2, 12), vocab) for _ in range(n)]
        await asyncio.gather(
            *(check_query(spec, stock, s, q) for s, q in zip(sessions, questions))
        )


async def test_flash_evaluations_match_stock(spec, stock):
    rnd = random.Random(5)
    vocab = spec.vocab_size
    question = random_tokens(rnd, 4, vocab)
    session = await spec.create_session(
        repeating(rnd, 50, vocab),
        flash=[{"prompt": question, "sampling_params": greedy(ANSWER_TOKENS), "flash_id": "f"}],
    )
    events = spec.subscribe(session.id)
    for _ in range(3):
        version = await spec.append(session.id, repeating(rnd, rnd.randrange(1, 40), vocab))
        while True:
            event = await asyncio.wait_for(events.get(), 60)
            if event.type == "flash" and event.version == version:
                break
        expected = await reference(stock, session.tokens_at(version) + question, ANSWER_TOKENS)
        assert event.data["token_ids"] == expected
        hit = await spec.query(session.id, question, greedy(ANSWER_TOKENS))
        assert hit.flash and hit.token_ids == expected and hit.computed_tokens == 0


# ----------------------------------------------------------------- settings


def test_setting_in_both_serve_paths(monkeypatch):
    """``VLLM_STATEFUL_SPECULATION`` reaches ``vllm serve --plugin stateful``
    (``prepare_args``) and ``stateful_engine_args``; a user's own
    speculative config always wins; a bad value is a usage error."""
    from vllm_stateful import stateful_engine_args
    from vllm_stateful.config import DEFAULT_SPECULATION, speculative_config
    from vllm_stateful.serve_args import UsageError, prepare_args, serve_parser

    parser = serve_parser("vllm serve")

    def served(*argv):
        return prepare_args(parser.parse_args(["--model", "m", *argv])).speculative_config

    monkeypatch.setenv("VLLM_STATEFUL_SPECULATION", "ngram")
    ngram = speculative_config("ngram")
    assert ngram["method"] == "ngram" and ngram["num_speculative_tokens"] == 4
    assert ngram["num_speculative_tokens_per_batch_size"] == [
        [1, 1, 4], [2, 4, 2], [5, 8, 1], [9, 1 << 20, 0],
    ]  # fmt: skip
    assert served() == ngram
    assert stateful_engine_args(model="m").speculative_config == ngram
    mine = '{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 3}'
    assert served("--speculative-config", mine)["num_speculative_tokens"] == 2
    assert stateful_engine_args(model="m", speculative_config=None).speculative_config is None

    monkeypatch.setenv("VLLM_STATEFUL_SPECULATION", "off")
    assert served() is None
    assert stateful_engine_args(model="m").speculative_config is None

    monkeypatch.delenv("VLLM_STATEFUL_SPECULATION")
    assert DEFAULT_SPECULATION == "ngram"
    assert served() == ngram
    assert stateful_engine_args(model="m").speculative_config == ngram

    monkeypatch.setenv("VLLM_STATEFUL_SPECULATION", "eagle")
    with pytest.raises(UsageError, match="VLLM_STATEFUL_SPECULATION"):
        served()


def test_numba_layer_set_only_for_the_ngram_proposer(monkeypatch):
    from vllm_stateful.numba_threads import keep_engine_threads

    monkeypatch.delenv("NUMBA_THREADING_LAYER", raising=False)
    keep_engine_threads(None)
    keep_engine_threads({"method": "suffix"})
    assert "NUMBA_THREADING_LAYER" not in os.environ
    keep_engine_threads({"method": "ngram", "num_speculative_tokens": 2})
    assert os.environ["NUMBA_THREADING_LAYER"] == "workqueue"
    monkeypatch.setenv("NUMBA_THREADING_LAYER", "tbb")  # the user's choice stands
    keep_engine_threads({"method": "ngram"})
    assert os.environ["NUMBA_THREADING_LAYER"] == "tbb"


async def test_parameters_speculation_cannot_serve_are_refused(spec, stock):
    """vLLM refuses min_p and logit_bias with speculative decoding on: a
    question or a flash registration asking for them gets the typed input
    error (HTTP 400) and the session is untouched and still answers."""
    from vllm import SamplingParams

    from vllm_stateful.errors import InvalidInputError

    session = await spec.create_session(list(range(40, 90)))
    version = session.version
    # Seeded sampling: greedy sampling drops min_p altogether.
    bad = SamplingParams(temperature=0.8, seed=1, max_tokens=4, min_p=0.2)
    with pytest.raises(InvalidInputError, match="min_p"):
        await spec.query(session.id, [5, 6], bad)
    with pytest.raises(InvalidInputError, match="min_p"):
        await spec.register_flash(session.id, [5, 6], bad)
    assert spec.list_flash(session.id) == []
    assert session.version == version
    await check_query(spec, stock, session, [5, 6])
