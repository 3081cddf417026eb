"""How many ingestion tokens a scheduler step may carry.

The cost of a step on these engines is close to linear in the prompt tokens
it computes: ``t = base + per_token * prompt_tokens``, where ``base`` is a
pure decode step (dominated by reading the weights) and ``per_token`` grows
with the context the tokens attend to. Both are fitted online to the
engine's own steps (least squares with exponential forgetting, so the fit
follows the streams' growing context), never assumed: the allowance follows
the machine, the model and the context. Steps of every kind feed the fit,
so it works under pure ingestion too, where no decode step ever runs.

Two limits come out of it:

* ``foreground_tokens``: while a question (or any foreground request) runs,
  a step may carry only as many ingestion tokens as keep it within
  ``1 + slack`` of a pure decode step, so questions barely notice ingestion;
* ``idle_tokens``: with no foreground work, a step may run up to
  ``1 + idle_factor`` decode steps long. That is the longest a newly arrived
  question waits for the step in flight (one chunk); the factor sets the
  trade between ingestion throughput (``idle_factor / (1 + idle_factor)`` of
  unbounded steps) and that wait.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCostModel:
    slack: float = 0.25
    idle_factor: float = 6.0
    min_tokens: int = 4  # progress is guaranteed whatever the measurements say
    max_tokens: int = 8192
    decay: float = 0.98  # weight kept by older samples per new one (~50-step memory)
    # Exponentially weighted sums of 1, P, P^2, t, P*t over steps.
    _s: tuple[float, float, float, float, float] = (0.0, 0.0, 0.0, 0.0, 0.0)
    base_s: float | None = None  # a pure decode step
    per_token_s: float | None = None  # one more prompt token in a step

    def observe(self, duration_s: float, prompt_tokens: int) -> None:
        """One finished step: its wall time and the prompt (non-decode)
        tokens it computed."""
        p, t, d = float(prompt_tokens), duration_s, self.decay
        s0, s1, s2, t0, t1 = self._s
        self._s = (d * s0 + 1, d * s1 + p, d * s2 + p * p, d * t0 + t, d * t1 + p * t)
        self._fit()

    def _fit(self) -> None:
        s0, s1, s2, t0, t1 = self._s
        det = s0 * s2 - s1 * s1
        # Too little spread in step sizes to tell base from per-token cost.
        if s0 < 4 or det <= 1e-9 * max(s0 * s2, 1.0):
            return
        slope = (s0 * t1 - s1 * t0) / det
        base = (t0 - slope * s1) / s0
        if slope > 0 and base > 0:
            self.base_s, self.per_token_s = base, slope

    def foreground_tokens(self) -> int:
        return self._tokens_for(self.slack)

    def idle_tokens(self) -> int:
        return self._tokens_for(self.idle_factor)

    def _tokens_for(self, extra_steps: float) -> int:
        if self.base_s is None or self.per_token_s is None:
            # Nothing fitted yet: the floor beside questions, moderate steps
            # otherwise (their spread is what the first fit needs).
            return self.min_tokens if extra_steps < 1 else min(64 * self.min_tokens, self.max_tokens)
        tokens = int(extra_steps * self.base_s / self.per_token_s + 1e-6)
        return max(self.min_tokens, min(tokens, self.max_tokens))
