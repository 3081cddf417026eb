"""How many ingestion tokens a scheduler step may carry.

The cost of a step on these engines is close to linear in what it computes:
``t = fixed + per_decode * D + per_token * P + per_prefill * R`` for ``D``
requests decoding, ``P`` prompt (prefill) tokens and ``R`` requests
prefilling. ``fixed`` is dominated by reading the weights; ``per_decode``
by each decoding request's attention over its context; ``per_prefill`` by
the same read of the KV cache for a prefill chunk, however few tokens it
has; ``per_token`` grows with the context prompt tokens attend to. All
four are fitted online to the engine's own steps (least squares with
exponential forgetting, so the fit follows the streams' growing context),
never assumed: the allowance follows the machine, the model and the
context. Steps of every kind feed the fit, so it works under pure ingestion
too, where no decode step ever runs.

Three limits come out of it (and ``pack``, which fits chunks of several
streams into a step's time, each paying its per-prefill cost):

* ``foreground_tokens(D)``: while questions (or any foreground requests)
  run, a step may carry only as many ingestion tokens as keep it within
  ``1 + slack`` of the pure decode step of those ``D`` requests, so
  questions barely notice ingestion;
* ``ingest_beside(D)``: whether an ingestion chunk fits beside them at all.
  On CPU it does not: a chunk of a few tokens over a 3k-token stream made a
  question's decode step 62% longer (SmolLM2, 2-core EPYC: 44 against
  27 ms), so ingestion then sits out and only a starved chunk joins;
* ``idle_tokens(active)``: with no foreground work, a step may run up to
  ``1 + factor`` single-request decode steps long. That is the longest a
  newly arrived question waits for the step in flight (one chunk); the
  factor sets the trade between ingestion throughput (about
  ``factor / (1 + factor)`` of unbounded steps) and that wait. While
  questions come (``active``) the factor is small, so they barely wait,
  and grows (up to twice) once ingestion has waited past a target lag, so
  streams catch up; after a quiet spell it is large, so a feed alone runs
  at full speed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class StepCostModel:
    slack: float = 0.1
    idle_factor: float = 12.0
    active_factor: float = 1.5
    min_tokens: int = 4  # progress is guaranteed whatever the measurements say
    lag_target_s: float = 1.0
    max_boost: float = 2.0
    max_tokens: int = 8192
    decay: float = 0.98  # weight kept by older samples per new one (~50-step memory)
    # Exponentially weighted normal equations over steps, x = (1, D, P, R).
    _xtx: np.ndarray = field(default_factory=lambda: np.zeros((4, 4)))
    _xty: np.ndarray = field(default_factory=lambda: np.zeros(4))
    fixed_s: float | None = None
    per_decode_s: float | None = None
    per_token_s: float | None = None
    per_prefill_s: float = 0.0

    def observe(
        self, duration_s: float, prompt_tokens: int, decoding: int, prefilling: int | None = None
    ) -> None:
        """One finished step: its wall time, the prompt (prefill) tokens it
        computed, the number of requests that decoded in it and the number
        that prefilled (default: one if it computed prompt tokens)."""
        if prefilling is None:
            prefilling = int(prompt_tokens > 0)
        x = np.array([1.0, float(decoding), float(prompt_tokens), float(prefilling)])
        self._xtx = self.decay * self._xtx + np.outer(x, x)
        self._xty = self.decay * self._xty + duration_s * x
        self._fit()

    def _fit(self) -> None:
        if self._xtx[0, 0] < 4:
            return
        # Which effects the steps so far can tell apart: without decode-only
        # variety the per-decode cost folds into the fixed one, without
        # steps that differ in prefilling requests for the same tokens the
        # per-prefill cost folds into the others, and without any spread in
        # prompt tokens nothing is fitted.
        if not self._varies(2):
            return
        cols = [0, *([1] if self._varies(1) else []), 2, *([3] if self._varies(3) else [])]
        a = self._xtx[np.ix_(cols, cols)]
        b = self._xty[cols]
        try:
            coef = dict(zip(cols, np.linalg.solve(a + 1e-12 * np.eye(len(cols)), b)))
        except np.linalg.LinAlgError:
            return
        fixed, per_token = coef[0], coef[2]
        per_decode, per_prefill = coef.get(1, 0.0), coef.get(3, 0.0)
        # (A per-prefill cost of zero comes out a rounding error either side.)
        if fixed > 0 and per_token > 0 and per_decode >= 0 and per_prefill > -1e-6:
            self.fixed_s, self.per_decode_s, self.per_token_s = fixed, per_decode, per_token
            self.per_prefill_s = max(per_prefill, 0.0)

    def _varies(self, i: int) -> bool:
        n, s, ss = self._xtx[0, 0], self._xtx[0, i], self._xtx[i, i]
        return n * ss - s * s > 1e-9 * max(n * ss, 1.0)

    @property
    def fitted(self) -> bool:
        """Whether the steps so far gave a fit (``_fit`` sets the fixed and
        the per-token cost together, both positive)."""
        return self.fixed_s is not None

    def decode_step_s(self, decoding: int) -> float | None:
        if not self.fitted:
            return None
        return self.fixed_s + (self.per_decode_s or 0.0) * max(decoding, 1)

    def foreground_tokens(self, decoding: int = 1) -> int:
        return self._tokens_for(self.slack, decoding)

    def ingest_beside(self, decoding: int = 1) -> bool:
        """Whether an ingestion chunk of the floor's size keeps a step of
        ``decoding`` foreground requests within ``1 + slack`` of their pure
        decode step (true until something is fitted)."""
        if not self.fitted:
            return True
        step = self.decode_step_s(decoding)
        return self.per_prefill_s + self.per_token_s * self.min_tokens <= self.slack * step

    def idle_tokens(self, active: bool = False, waited_s: float = 0.0) -> int:
        """``waited_s``: how long the oldest data in the engine has waited
        since it was acknowledged. While questions come, steps grow with it past
        ``lag_target_s``, up to ``max_boost`` times: short steps keep a
        question's wait short, but their fixed cost caps ingestion (on a
        2-core EPYC, steps of ~40 tokens ingested about half of what long
        ones do), so a stream falling behind would never catch up."""
        return self._tokens_for(self._factor(active, waited_s), 1)

    def _factor(self, active: bool, waited_s: float) -> float:
        if not active:
            return self.idle_factor
        boost = min(self.max_boost, max(1.0, waited_s / self.lag_target_s))
        return min(self.active_factor * boost, self.idle_factor)

    def step_s(self, decoding: int, prompt_tokens: int = 0, prefilling: int = 0) -> float | None:
        """The predicted time of a step (None until fitted)."""
        if not self.fitted:
            return None
        step = self.decode_step_s(decoding)
        if not decoding:
            step -= self.per_decode_s or 0.0
        return step + self.per_token_s * prompt_tokens + self.per_prefill_s * prefilling

    def idle_step_s(self, active: bool = False, waited_s: float = 0.0) -> float | None:
        """How long a step with no foreground work may take: the step of one
        chunk of ``idle_tokens`` (None until fitted). Exactly that, so a lone
        chunk gets the same tokens by time as by count, and with a factor of
        0 only the floor."""
        if not self.fitted:
            return None
        factor = self._factor(active, waited_s)
        return self.step_s(0) + self.per_prefill_s + factor * self.decode_step_s(1)

    def pack(self, room_s: float, needs: list[int | None]) -> list[int]:
        """Ingestion tokens per chunk, in order, so that the chunks fit in
        ``room_s`` (the step's target time less what the rest of the step
        costs). Each chunk pays ``per_prefill`` (its read of the stream's
        KV) however few tokens it has, so the room goes to as few chunks as
        possible: a chunk is cut (0) once what is left would not carry
        ``min_tokens``; the first always gets up to ``min_tokens`` (ingestion
        always progresses). ``None``: a need not known yet (a waiting
        request, before its cached prefix is matched)."""
        per_token = self.per_token_s or 1.0
        grants: list[int] = []
        for need in needs:
            want = self.max_tokens if need is None else need
            n = min(want, max(int((room_s - self.per_prefill_s) / per_token + 1e-6), 0))
            if n < min(want, self.min_tokens):
                n = 0 if any(grants) else min(want, self.min_tokens)
            grants.append(n)
            if n:
                room_s -= self.per_prefill_s + per_token * n
        return grants

    def _tokens_for(self, extra_steps: float, decoding: int) -> int:
        if not self.fitted:
            # Nothing fitted yet: the floor beside questions, moderate steps
            # otherwise (their spread is what the first fit needs).
            return self.min_tokens if extra_steps < 1 else min(64 * self.min_tokens, self.max_tokens)
        tokens = int(extra_steps * self.decode_step_s(decoding) / self.per_token_s + 1e-6)
        return max(self.min_tokens, min(tokens, self.max_tokens))
