"""The step-cost fit behind the ingestion allowance (kv/pacing.py)."""

from __future__ import annotations

import pytest

from vllm_stateful.kv.pacing import StepCostModel

# A step: 20 ms fixed, 5 ms per decoding request, 2 ms per prompt token.
FIXED, PER_DECODE, PER_TOKEN = 0.020, 0.005, 0.002


def fitted(steps: list[tuple[int, int]], **kwargs) -> StepCostModel:
    """steps: (prompt tokens, decoding requests)."""
    model = StepCostModel(**kwargs)
    for p, d in steps:
        model.observe(FIXED + PER_DECODE * d + PER_TOKEN * p, p, d)
    return model


MIXED = [(0, 1), (3, 1), (64, 0), (256, 2), (17, 4), (0, 8), (100, 1)] * 10


def test_fit_recovers_step_costs_from_mixed_steps():
    model = fitted(MIXED, slack=0.5, idle_factor=6.0, active_factor=1.5, min_tokens=2)
    assert model.fixed_s == pytest.approx(FIXED)
    assert model.per_decode_s == pytest.approx(PER_DECODE)
    assert model.per_token_s == pytest.approx(PER_TOKEN)
    # Beside one question: 0.5 * (20 + 5) / 2 = 6.25 tokens; beside 8
    # questions the decode step is 60 ms, so 15 tokens; idle: 6 * 25 / 2 = 75.
    assert model.foreground_tokens(1) == 6
    assert model.foreground_tokens(8) == 15
    assert model.idle_tokens() == 75
    # While questions come: 1.5 * 25 / 2 = 18.75.
    assert model.idle_tokens(active=True) == 18
    # ... and once ingestion has waited past the target lag (1 s), longer
    # in proportion (1.5 s: 28.1 tokens), at most twice (37.5).
    assert model.idle_tokens(active=True, waited_s=0.9) == 18
    assert model.idle_tokens(active=True, waited_s=1.5) == 28
    assert model.idle_tokens(active=True, waited_s=30.0) == 37
    assert model.idle_tokens(active=False, waited_s=30.0) == 75


def test_fit_works_under_pure_ingestion():
    # No decode step ever runs: only prefill chunks of two sizes; the
    # per-decode cost cannot be told apart and is folded into the fixed one.
    model = fitted([(256, 0), (256, 0), (100, 0)] * 20, idle_factor=6.0)
    assert model.fixed_s == pytest.approx(FIXED)
    assert model.per_decode_s == 0.0
    assert model.idle_tokens() == 60  # 6 * 20 / 2


def test_floor_and_unfitted_defaults():
    model = fitted([(256, 0)] * 30, min_tokens=4)  # no spread: nothing can be fitted
    assert model.fixed_s is None
    assert model.foreground_tokens() == 4
    assert model.idle_tokens() == 256
    # A fitted allowance below the floor is raised to it.
    assert fitted(MIXED, slack=0.1, min_tokens=4).foreground_tokens(1) == 4


def test_fit_follows_a_growing_context():
    model = fitted(MIXED)
    for p, d in MIXED * 10:  # the context grew: prompt tokens cost twice as much
        model.observe(FIXED + PER_DECODE * d + 2 * PER_TOKEN * p, p, d)
    assert model.per_token_s == pytest.approx(2 * PER_TOKEN, rel=0.01)


def test_only_questions_make_ingestion_steps_short():
    # The scheduler shortens ingestion steps for a while after a question
    # (kv/arrange.py `_foreground_seen`); control requests are foreground
    # but not questions, so a feed that closes or probes sessions keeps its
    # full-speed steps. Classified on vLLM's own Request objects.
    from vllm import SamplingParams
    from vllm.v1.request import Request

    from vllm_stateful.kv.lanes import Lane, is_question, lane_of
    from vllm_stateful.protocol import Op, RequestTag

    def request(op: Op | None) -> Request:
        extra = None if op is None else RequestTag("s", op).to_extra_args()
        return Request("r", [1, 2, 3], SamplingParams(max_tokens=1, extra_args=extra), None)

    questions = {op: is_question(request(op)) for op in Op}
    assert questions == {
        Op.APPEND: False, Op.QUERY: True, Op.FLASH: False,
        Op.CLOSE: False, Op.PROBE: False, Op.OFFLOAD: False,
    }  # fmt: skip
    assert is_question(request(None))  # stateless OpenAI traffic
    lanes = {op: lane_of(request(op)) for op in Op}
    assert lanes == {
        Op.APPEND: Lane.INGEST, Op.QUERY: Lane.FOREGROUND, Op.FLASH: Lane.FLASH,
        Op.CLOSE: Lane.FOREGROUND, Op.PROBE: Lane.FOREGROUND, Op.OFFLOAD: Lane.FOREGROUND,
    }  # fmt: skip
    # An append a flash question rides is ingestion until its prompt is
    # computed, then flash work (the answer's decode).
    extra = RequestTag("s", Op.APPEND, data_tokens=2).to_extra_args()
    ride = Request("r", [1, 2, 3], SamplingParams(max_tokens=4, extra_args=extra), None)
    assert lane_of(ride) is Lane.INGEST and not is_question(ride)
    ride.num_computed_tokens = 2
    assert lane_of(ride) is Lane.INGEST
    ride.num_computed_tokens = 3
    assert lane_of(ride) is Lane.FLASH


def test_per_prefill_cost_keeps_ingestion_out_beside_questions():
    """A prefill chunk that pays a fixed read of its stream's KV (here
    12 ms, half a decode step) costs more than the slack beside a question
    however few tokens it has: ingestion then sits out (``ingest_beside``
    false), while the same model without that cost lets it in."""
    per_prefill = 0.012
    steps = [(p, d, r) for p, d in MIXED for r in ((1, 2) if p else (0,))]
    model = StepCostModel(slack=0.1, min_tokens=4)
    for p, d, r in steps:
        model.observe(FIXED + PER_DECODE * d + PER_TOKEN * p + per_prefill * r, p, d, r)
    assert model.per_prefill_s == pytest.approx(per_prefill)
    assert model.per_token_s == pytest.approx(PER_TOKEN)
    # Beside one question: 12 + 4 * 2 = 20 ms of ingestion > 0.1 * 25 ms.
    assert not model.ingest_beside(1)
    # With a slack of a whole decode step (25 ms) the chunk fits.
    model.slack = 1.0
    assert model.ingest_beside(1)
    # Without the per-prefill cost: 4 * 2 = 8 ms <= 0.5 * 25 ms.
    assert fitted(MIXED, slack=0.5, min_tokens=4).ingest_beside(1)
    # Nothing fitted yet: ingestion is let in (the floor).
    assert StepCostModel().ingest_beside(1)


def test_chunks_fill_a_step_by_time_each_paying_its_kv_read():
    """``pack``: ingestion chunks share a step's room in order, each charged
    the per-prefill cost (12 ms) on top of its tokens (2 ms each); a chunk
    that would carry fewer than ``min_tokens`` sits out, except the first."""
    per_prefill = 0.012
    steps = [(p, d, r) for p, d in MIXED for r in ((1, 2) if p else (0,))]
    model = StepCostModel(min_tokens=4)
    for p, d, r in steps:
        model.observe(FIXED + PER_DECODE * d + PER_TOKEN * p + per_prefill * r, p, d, r)
    # 100 ms: 30 tokens (12 + 60 ms), then (100 - 72 - 12) / 2 = 8, then none.
    assert model.pack(0.100, [30, 100, None]) == [30, 8, 0]
    # The same room where a chunk must carry 16: the second sits out too.
    model.min_tokens = 16
    assert model.pack(0.100, [30, 100, None]) == [30, 0, 0]
    # A need not known yet (a waiting chunk) takes what is left: 44 tokens.
    assert model.pack(0.100, [None, 5]) == [44, 0]
    # No room at all: the first still gets the floor, the rest sit out.
    assert model.pack(0.005, [100, 50]) == [16, 0]
    assert model.pack(-1.0, [3, 50]) == [3, 0]
    # The time a step may take with no question running is the step of one
    # chunk of the token allowance: 20 ms fixed + 12 ms KV read + 6 decode
    # steps (20 + 5 ms each), so a lone chunk gets the same 6 * 25 / 2 = 75
    # tokens either way, and with a factor of 0 the floor only.
    model.idle_factor = 6.0
    assert model.idle_step_s() == pytest.approx(FIXED + per_prefill + 6 * 0.025)
    assert model.pack(model.idle_step_s() - model.step_s(0), [1000]) == [75]
    assert model.idle_tokens() == 75
    model.idle_factor = 0.0
    assert model.pack(model.idle_step_s() - model.step_s(0), [1000, 1000]) == [16, 0]
    assert model.pack(model.idle_step_s() - model.step_s(0), [None, None]) == [16, 0]
    expected = FIXED + 2 * PER_DECODE + 10 * PER_TOKEN + per_prefill
    assert model.step_s(2, 10, 1) == pytest.approx(expected)
    assert model.step_s(0) == pytest.approx(FIXED)
