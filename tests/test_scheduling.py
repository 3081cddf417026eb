"""Request classes in the engine (kv/scheduler.py): questions and stateless
requests go before ingestion, ingestion before flash work.

The test engine paces ingestion exactly (conftest: at most
INGEST_STEP_TOKENS ingestion tokens per engine step), so the figures the
engine reports per request can be asserted exactly, not timed.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid

from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from tests.conftest import INGEST_CHUNK_TOKENS, INGEST_STEP_TOKENS, STEP_TRACE
from tests.helpers import greedy, reference
from vllm_stateful.protocol import REPORT_KEY, EngineReport, Op

LARGE = 3000  # tokens: about 94 engine steps of ingestion


def _tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 500) for _ in range(n)]


async def _ask(engine, session, question: list[int], max_tokens: int = 16):
    """A session question through the engine RPC, with the engine's report."""
    version = session.ingested_version
    prompt = session.tokens_at(version) + question
    params = greedy(max_tokens)
    out = await engine.rpc.final(session.key, prompt, params, Op.QUERY)
    return out, EngineReport.from_params(out.kv_transfer_params), version


async def test_question_during_large_append_starts_next_step(engine, stock):
    s = await engine.create_session(_tokens(40, 1))
    v = await engine.append(s.id, _tokens(LARGE, 2))
    await asyncio.sleep(0.05)  # ingestion is under way
    out, report, seen = await _ask(engine, s, [5, 6, 7])
    # Ingestion was still running when the question finished: the two overlapped.
    assert s.ingested_version < v
    assert report.waited_steps == 0  # admitted in the step after it arrived
    assert report.ingest_tokens_waited == 0
    assert 0 < report.max_ingest_alongside <= INGEST_STEP_TOKENS
    # The question read the version ingested before the append, exactly.
    assert seen == 0
    expected = await reference(stock, s.tokens_at(0) + [5, 6, 7], 16)
    assert list(out.outputs[0].token_ids) == expected
    # The append, ingested in many small steps, equals stock vLLM.
    await engine.wait_ingested(s.id, v)
    question = [11, 12, 13]
    answer = await engine.query(s.id, question, greedy(8))
    assert answer.computed_tokens == len(question)
    assert answer.token_ids == await reference(stock, s.tokens_at(v) + question, 8)


async def test_stateless_request_waits_for_at_most_one_chunk(engine, stock):
    s = await engine.create_session(_tokens(40, 3))
    await engine.register_flash(s.id, [21, 22], greedy(8))
    v = await engine.append(s.id, _tokens(LARGE, 4))
    await asyncio.sleep(0.05)
    prompt = _tokens(50, 5)
    params = greedy(8)
    params.extra_args = {REPORT_KEY: True}
    final = None
    async for out in engine.engine.generate(
        TokensPrompt(prompt_token_ids=prompt), params, f"plain-{uuid.uuid4().hex}"
    ):
        final = out
    report = EngineReport.from_params(final.kv_transfer_params)
    assert s.ingested_version < v
    assert report.waited_steps == 0
    assert report.ingest_tokens_waited == 0
    assert report.max_ingest_alongside <= INGEST_STEP_TOKENS
    assert list(final.outputs[0].token_ids) == await reference(stock, prompt, 8)
    await engine.wait_ingested(s.id, v)


async def test_flash_progresses_under_a_continuous_stream(engine, stock):
    """Ingestion never runs dry here (each append is larger than what the
    engine ingests per step), yet flash evaluations finish while it streams."""
    s = await engine.create_session(_tokens(40, 6))
    events = engine.subscribe(s.id)
    await engine.register_flash(s.id, [31, 32], greedy(4), flash_id="f")
    flash_versions: list[int] = []
    appended = 0
    for i in range(400):
        await engine.append(s.id, _tokens(INGEST_STEP_TOKENS * 2, 100 + i))
        appended += 1
        while not events.empty():
            event = events.get_nowait()
            if event.type == "flash" and event.version > 0:
                flash_versions.append(event.version)
        if flash_versions:
            break
        await asyncio.sleep(0.01)
    assert flash_versions, f"no flash answer on a new version during {appended} appends"
    # Streaming was still going on: versions were appended after the one answered.
    assert s.version > flash_versions[0]
    # The answer is right for the version it names.
    result = s.flash_results["f"]
    expected = await reference(stock, s.tokens_at(result.version) + [31, 32], 4)
    assert result.version >= flash_versions[0] and result.token_ids == expected
    engine.unsubscribe(s.id, events)
    await engine.wait_ingested(s.id)


async def test_step_trace_shows_a_question_step_by_step(engine, stock):
    """The step trace (VLLM_STATEFUL_STEP_TRACE) of an idle engine answering
    one question: a prefill of the question's own tokens over the pinned
    stream, then one decode token per step, each with its context."""
    s = await engine.create_session(_tokens(40, 7))
    start = time.monotonic()  # system-wide: comparable with the engine's clock
    answer = await engine.query(s.id, [5, 6, 7], greedy(4))
    assert answer.computed_tokens == 3
    with open(STEP_TRACE) as f:
        steps = [json.loads(line) for line in f]
    mine = [requests for end, _, requests, _ in steps if end >= start]
    # (lane 0 = foreground, tokens in the step, tokens computed after it)
    assert mine == [[[0, 3, 43]], [[0, 1, 44]], [[0, 1, 45]], [[0, 1, 46]]]
    assert all(duration > 0 for end, duration, _, _ in steps if end >= start)


async def test_flash_runs_alone_while_ingestion_keeps_up(engine, stock):
    """With no question and ingestion within one long step (here
    INGEST_STEP_TOKENS), a flash evaluation's steps carry no ingestion: an
    append that arrives while it runs waits for it (fewer steps than
    ``starve_steps``), so the evaluation takes its idle number of steps."""
    s = await engine.create_session(_tokens(40, 8))
    events = engine.subscribe(s.id)
    await engine.register_flash(s.id, [41, 42], greedy(4), flash_id="f")
    start = time.monotonic()
    for i in range(12):
        v = await engine.append(s.id, _tokens(8, 200 + i))
        await engine.wait_ingested(s.id, v)  # its flash evaluation starts now
    while (event := await asyncio.wait_for(events.get(), 30)).type != "flash" or event.version < v:
        pass
    engine.unsubscribe(s.id, events)
    with open(STEP_TRACE) as f:
        steps = [json.loads(line) for line in f]
    lanes = [{lane for lane, _, _ in requests} for end, _, requests, _ in steps if end >= start]
    assert sum(1 in x for x in lanes) >= 12 and sum(2 in x for x in lanes) >= 4
    assert not [x for x in lanes if {1, 2} <= x]
    result = s.flash_results["f"]
    assert result.version == v
    assert result.token_ids == await reference(stock, s.tokens_at(v) + [41, 42], 4)


async def test_engine_paces_by_the_age_of_acknowledged_data(engine, stock):
    """The engine paces ingestion by how long acknowledged data has waited
    (the tag's ``since``), not by how long the chunk in flight has: a large
    append is ingested in many chunks, one engine request each, and the
    steps of its last chunk see the lag from the append's acknowledgement,
    all the earlier chunks' time, not the few steps that chunk has run."""
    s = await engine.create_session(_tokens(40, 9))
    assert LARGE // INGEST_CHUNK_TOKENS >= 10
    v = await engine.append(s.id, _tokens(LARGE, 10))
    acknowledged = time.monotonic()  # system-wide: comparable with the engine's clock
    await engine.wait_ingested(s.id, v)
    with open(STEP_TRACE) as f:
        steps = [json.loads(line) for line in f]
    # This append's ingestion steps: lane 1, contexts past the session's 40
    # tokens; (start, lag) each.
    mine = [
        (end - duration, lag)
        for end, duration, requests, lag in steps
        if end > acknowledged and any(lane == 1 and c > 40 for lane, _, c in requests)
    ]
    assert len(mine) >= LARGE // INGEST_STEP_TOKENS
    for start, lag in mine:
        # (The lag is taken when the step is arranged, just before it
        # starts; 20 ms covers that and the trace's rounding.)
        assert lag >= start - acknowledged - 0.02
    # Ten chunks came before the last one's request arrived: a lag counted
    # from its arrival would be about 0 at its first step.
    start, lag = mine[-(INGEST_CHUNK_TOKENS // INGEST_STEP_TOKENS)]
    assert lag >= 0.5 * (start - acknowledged) > 0
