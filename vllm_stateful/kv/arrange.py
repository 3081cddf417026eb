"""What vLLM's scheduler sees in a step: the queues ordered by class, the
requests that sit the step out, and the step's token budget.

* running and waiting requests are ordered by class, so the token budget
  goes to foreground work first and vLLM's preemption victim (the last
  running request) is the least urgent one;
* while foreground work exists, the step's token budget is what the
  foreground needs plus a small ingestion allowance (``pacing.py``), so a
  step carrying ingestion costs little more than a pure decode step; where
  even the smallest chunk would cost more than that (on CPU, a prefill
  chunk's read of its stream's KV alone does), ingestion sits the step out
  like flash work (it stays running with its KV, paused, not thrown away);
  a request passed over ``starve_steps`` times in a row beside foreground
  work is let in, so every class always makes progress;
* when a foreground request is waiting to be admitted, running ingestion
  and flash requests sit the step out, so it is admitted at once instead of
  after their prefill;
* with no foreground work, flash evaluations go first (they are small and
  only useful while fresh; a waiting one is admitted at once), alone while
  ingestion keeps up (what waits is within one long step, and no data is
  older than the target lag), sharing their steps with ingestion that is
  behind;
* ingestion steps are capped: short while questions keep coming (the
  longest a question arriving now waits for the step in flight), growing
  once the oldest data in the engine has waited past a target lag (so a
  stream behind catches up), long after a quiet spell, so a feed alone
  runs near full speed. The cap is a time, filled by the step-cost fit:
  each chunk pays a read of its stream's KV, so a step goes to as few
  streams' chunks as fit.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm_stateful.config import SchedulingConfig
from vllm_stateful.kv.lanes import Lane, asks, data_since, lane_for, tag_of
from vllm_stateful.kv.pacing import StepCostModel
from vllm_stateful.kv.steps import StepLog

if TYPE_CHECKING:
    from vllm.v1.request import Request


def need(r: Request) -> int:
    """Tokens the request would compute in a step with room for all."""
    return max(r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens, 0)


def needs(requests: Iterable[Request]) -> int:
    return sum(map(need, requests))


@dataclass
class Arrangement:
    running: list[Request]  # in order: what may run
    waiting: list[Request]  # in order: what may be admitted
    hidden_running: list[Request]  # sit the step out (paused, KV kept)
    hidden_waiting: list[Request]
    budget: int  # the step's token budget
    ingest_lag_s: float  # how long the oldest data in the engine has waited
    lanes: dict[str, Lane]  # per request id, running and waiting


class Arranger:
    def __init__(self, cfg: SchedulingConfig, cost: StepCostModel, steps: StepLog):
        self.cost = cost
        self.steps = steps
        self.starve_steps = cfg.starve_steps
        self.active_window_s = cfg.active_window_s
        self._foreground_seen = float("-inf")

    def starved(self, request: Request) -> bool:
        """Passed over for ``starve_steps`` steps that carried foreground
        work. Steps it sat out by choice do not count: a flash evaluation
        run alone while ingestion keeps up would otherwise starve every
        stream's chunk at once, and they would then join the next
        question's steps one by one, a few tokens each at a full read of
        their stream's KV (+10-20 ms on a ~35 ms step at 16 streams)."""
        wait = self.steps.waits.get(request.request_id)
        return wait is not None and wait.starving >= self.starve_steps

    def arrange(
        self, running: list[Request], waiting: list[Request], max_tokens: int
    ) -> Arrangement:
        # Tags are parsed once per request and step (this runs every step,
        # over every running and waiting request).
        tags = {r.request_id: tag_of(r) for r in (*running, *waiting)}
        lanes = {r.request_id: lane_for(tags[r.request_id], r) for r in (*running, *waiting)}
        foreground = any(lane is Lane.FOREGROUND for lane in lanes.values())
        now = time.monotonic()
        if any(lanes[i] is Lane.FOREGROUND and asks(tag) for i, tag in tags.items()):
            self._foreground_seen = now
        # Flash work passed over too often goes first once, so it always
        # progresses even beside a steady stream of questions.
        starved = {
            r.request_id
            for r in (*running, *waiting)
            if lanes[r.request_id] is Lane.FLASH and self.starved(r)
        }

        def rank(r: Request) -> tuple[float, int]:
            if r.request_id in starved:
                return (-1, 0)
            lane: float = lanes[r.request_id]
            # With no question running, flash goes before ingestion: it is
            # small (a question and a few decode tokens) and its answers are
            # only useful while fresh.
            if not foreground and lane is Lane.FLASH:
                lane = Lane.INGEST - 0.5
            # Within a class, the request passed over longest goes first:
            # sessions share the ingestion allowance in turn.
            wait = self.steps.waits.get(r.request_id)
            return (lane, -(wait.passed_over if wait else 0))

        running = sorted(running, key=rank)  # stable
        waiting = sorted(waiting, key=rank)
        first = [r for r in running if rank(r)[0] < Lane.INGEST]
        # The ingestion lag: how long the oldest data in the engine, running
        # or waiting, has waited since it was acknowledged.
        since = [
            data_since(r, tags[r.request_id])
            for r in (*running, *waiting)
            if lanes[r.request_id] is Lane.INGEST
        ]
        waited = time.time() - min(since) if since else 0.0
        if foreground:
            # Whether an ingestion chunk fits beside the foreground at all.
            beside = self.cost.ingest_beside(len(first))
            waiting_first = any(lanes[r.request_id] is Lane.FOREGROUND for r in waiting)
        else:
            # Flash evaluations run alone while ingestion keeps up (what
            # waits is within one long step): sharing every step with a
            # chunk doubled an evaluation's time (4 decode steps of ~90
            # instead of ~35 ms on a 2-core EPYC), and a hit needs the
            # evaluation done within about its idle time. Ingestion that is
            # behind (more than one long step to do, or its oldest data
            # waiting past the lag target) shares their steps: a flash
            # decode costs a shared step little (~10 ms on ~100), while
            # steps of its own cost a question's each. (Only running chunks
            # count: what a waiting one still needs is known once its
            # cached prefix is.)
            ingest = (r for r in running if lanes[r.request_id] is Lane.INGEST)
            behind = needs(ingest) > self.cost.idle_tokens(False) or waited > self.cost.lag_target_s
            beside = not first or behind
            waiting_first = any(lanes[r.request_id] is Lane.FLASH for r in waiting)

        def sits_out(r: Request) -> bool:
            if rank(r)[0] < Lane.INGEST:
                return False
            # Admitting a waiting question (or, with none, a flash
            # evaluation) comes before any ingestion prefill; beside a
            # question, flash work pauses, and so does ingestion that does
            # not fit beside what runs first, until it is starved.
            if waiting_first or lanes[r.request_id] is Lane.FLASH:
                return True
            return not beside and not self.starved(r)

        out = {r.request_id for r in (*running, *waiting) if sits_out(r)}
        if waiting_first:
            budget = max_tokens
        elif foreground:
            # A starved chunk beside questions gets the floor: its step is
            # one of theirs (a bigger chunk measured +75 ms on a 30 ms step).
            allowance = self.cost.foreground_tokens(len(first)) if beside else self.cost.min_tokens
            budget = needs(first) + allowance
        else:
            # Questions seen lately: short ingestion steps, since one may
            # arrive any moment and wait for the step in flight; none for a
            # while: long ones, for throughput.
            active = now - self._foreground_seen < self.active_window_s
            chunks, queued = (
                [r for r in rs if lanes[r.request_id] is Lane.INGEST and r.request_id not in out]
                for rs in (running, waiting)
            )
            allowance, cut = self._fill(first, chunks, queued, active, waited)
            out |= cut
            budget = needs(first) + allowance
        return Arrangement(
            running=[r for r in running if r.request_id not in out],
            waiting=[r for r in waiting if r.request_id not in out],
            hidden_running=[r for r in running if r.request_id in out],
            hidden_waiting=[r for r in waiting if r.request_id in out],
            budget=max(1, min(budget, max_tokens)),
            ingest_lag_s=waited,
            lanes=lanes,
        )

    def _fill(
        self, first: list[Request], chunks: list[Request], queued: list[Request],
        active: bool, waited: float,
    ) -> tuple[int, set[str]]:
        """A step with no foreground work: the ingestion tokens it carries
        and the chunks (running, then waiting) that sit it out. The chunks
        fill the step's target time after what runs first (flash
        evaluations), each charged its read of its stream's KV: a token
        allowance alone let three streams' chunks share a step and made it
        ~150-200 ms instead of ~90 (16 streams, 2-core EPYC)."""
        target = self.cost.idle_step_s(active, waited)
        if target is None:  # nothing fitted yet: by tokens
            return self.cost.idle_tokens(active, waited), set()
        prefilling = [r for r in first if r.num_computed_tokens < r.num_prompt_tokens]
        rest = self.cost.step_s(len(first) - len(prefilling), needs(prefilling), len(prefilling))
        # A waiting chunk's need is known once its cached prefix is matched.
        grants = self.cost.pack(
            target - (rest or 0.0), [*map(need, chunks), *[None] * len(queued)]
        )
        return sum(grants), {r.request_id for r, n in zip([*chunks, *queued], grants) if not n}
