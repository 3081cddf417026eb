"""How many ingestion tokens a scheduler step may carry.

The cost of a step on these engines is close to linear in the prompt tokens
it computes: ``t = base + per_token * prefill_tokens``, where ``base`` is a
pure decode step (dominated by reading the weights) and ``per_token`` grows
with the context the tokens attend to. Both are measured online from the
engine's own steps (exponential moving averages), never assumed, so the
allowance follows the machine, the model and the streams' context.

Two limits come out of it:

* ``foreground_tokens``: while a question (or any foreground request) runs,
  a step may carry only as many ingestion tokens as keep it within
  ``1 + slack`` of a pure decode step, so questions barely notice ingestion;
* ``idle_tokens``: with no foreground work, a step may run up to
  ``idle_factor`` decode steps long. That is the longest a newly arrived
  question waits for the step in flight (one chunk), and the factor sets the
  trade between ingestion throughput and that wait.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepCostModel:
    slack: float = 0.25
    idle_factor: float = 6.0
    min_tokens: int = 4  # progress is guaranteed whatever the measurements say
    max_tokens: int = 8192
    alpha: float = 0.2  # weight of a new sample in the moving averages
    base_s: float | None = None  # a pure decode step
    per_token_s: float | None = None  # one more prompt token in a step

    def observe(self, duration_s: float, prompt_tokens: int) -> None:
        """One finished step: its wall time and the prompt (non-decode)
        tokens it computed."""
        if prompt_tokens == 0:
            self.base_s = self._ewma(self.base_s, duration_s)
        elif self.base_s is not None:
            sample = max(duration_s - self.base_s, 0.0) / prompt_tokens
            self.per_token_s = self._ewma(self.per_token_s, sample)

    def foreground_tokens(self) -> int:
        return self._tokens_for(self.slack)

    def idle_tokens(self) -> int:
        return self._tokens_for(self.idle_factor)

    def _tokens_for(self, extra_steps: float) -> int:
        if self.base_s is None or not self.per_token_s:
            # Nothing measured yet: small steps until the first measurements.
            return self.min_tokens if extra_steps < 1 else min(16 * self.min_tokens, self.max_tokens)
        tokens = int(extra_steps * self.base_s / self.per_token_s)
        return max(self.min_tokens, min(tokens, self.max_tokens))

    def _ewma(self, old: float | None, sample: float) -> float:
        return sample if old is None else (1 - self.alpha) * old + self.alpha * sample
