"""The step-cost fit behind the ingestion allowance (kv/pacing.py)."""

from __future__ import annotations

import pytest

from vllm_stateful.kv.pacing import StepCostModel

BASE, PER_TOKEN = 0.025, 0.002  # a 25 ms decode step, 2 ms per prompt token


def fitted(sizes: list[int], **kwargs) -> StepCostModel:
    model = StepCostModel(**kwargs)
    for p in sizes:
        model.observe(BASE + PER_TOKEN * p, p)
    return model


def test_fit_recovers_step_costs_from_mixed_steps():
    model = fitted([0, 3, 64, 256, 17] * 10, slack=0.5, idle_factor=6.0, min_tokens=2)
    assert model.base_s == pytest.approx(BASE)
    assert model.per_token_s == pytest.approx(PER_TOKEN)
    # 0.5 * 25 / 2 = 6.25 tokens beside a question; 6 * 25 / 2 = 75 otherwise.
    assert model.foreground_tokens() == 6
    assert model.idle_tokens() == 75


def test_fit_works_under_pure_ingestion():
    # No decode step ever runs: only prefill chunks of two sizes.
    model = fitted([256, 256, 100] * 20)
    assert model.base_s == pytest.approx(BASE)
    assert model.idle_tokens() == 75


def test_floor_and_unfitted_defaults():
    model = fitted([256] * 30, min_tokens=4)  # no spread: nothing can be fitted
    assert model.base_s is None
    assert model.foreground_tokens() == 4
    assert model.idle_tokens() == 256
    # A fitted allowance below the floor is raised to it.
    assert fitted([0, 10, 50] * 10, slack=0.1, min_tokens=4).foreground_tokens() == 4


def test_fit_follows_a_growing_context():
    model = fitted([0, 30, 60] * 30)
    for p in [0, 30, 60] * 100:  # the context grew: prompt tokens cost twice as much
        model.observe(BASE + 2 * PER_TOKEN * p, p)
    assert model.per_token_s == pytest.approx(2 * PER_TOKEN, rel=0.01)
