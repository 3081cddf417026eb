"""The engine-side scheduler: vLLM's v1 ``Scheduler`` with request classes.

Three classes of work, in this order:

* foreground: session questions and every request that is not the plugin's
  (stateless OpenAI traffic is foreground too), plus the one-token control
  requests;
* ingestion: a session's appends (``Op.APPEND``);
* flash: background evaluations of registered questions (``Op.FLASH``).

vLLM's ``priority`` policy cannot express this: it orders only the waiting
queue, a waiting request never preempts, and running requests take the token
budget first, so a question would still wait behind a running prefill. This
subclass does not copy vLLM's ``schedule``; before each call it arranges what
vLLM's scheduler sees, and restores it afterwards:

* running and waiting requests are ordered by class, so the token budget
  goes to foreground work first and vLLM's preemption victim (the last
  running request) is the least urgent one;
* while foreground work exists, the step's token budget is what the
  foreground needs plus a small ingestion allowance (``pacing.py``), so a
  step carrying ingestion costs little more than a pure decode step; where
  even the smallest chunk would cost more than that (on CPU, a prefill
  chunk's read of its stream's KV alone does), ingestion sits the step out
  like flash work (it stays running with its KV, paused, not thrown away);
  a request passed over ``starve_steps`` times in a row is let in, so every
  class always makes progress;
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

Step records (``steps.py``) say what every request waited for; the connector
reports them when the request finishes. ``VLLM_STATEFUL_STEP_TRACE=<file>``
writes every step as a JSON line.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_stateful.config import SchedulingConfig
from vllm_stateful.kv.pacing import StepCostModel
from vllm_stateful.kv.steps import Step, StepLog, StepTrace
from vllm_stateful.protocol import Op, RequestTag

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# Under "vllm." so vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")

LOG_EVERY_S = 60.0  # how often the measured step costs are logged


class Lane(enum.IntEnum):
    """Request classes; a lower value is served first."""

    FOREGROUND = 0
    INGEST = 1
    FLASH = 2


_LANE_OF_OP = {Op.APPEND: Lane.INGEST, Op.FLASH: Lane.FLASH}


def _tag(request: Request) -> RequestTag | None:
    params = request.sampling_params
    return None if params is None else RequestTag.from_extra_args(params.extra_args)


def lane_of(request: Request) -> Lane:
    tag = _tag(request)
    return Lane.FOREGROUND if tag is None else _LANE_OF_OP.get(tag.op, Lane.FOREGROUND)


def data_since(request: Request) -> float:
    """When (wall clock) the oldest data an ingestion request carries was
    acknowledged; its arrival without the tag's word (vLLM stamps wall
    time)."""
    tag = _tag(request)
    since = None if tag is None else tag.since
    return request.arrival_time if since is None else min(since, request.arrival_time)


def need(r: Request) -> int:
    """Tokens the request would compute in a step with room for all."""
    return max(r.num_tokens_with_spec + r.num_output_placeholders - r.num_computed_tokens, 0)


def needs(requests: Any) -> int:
    return sum(map(need, requests))


def is_question(request: Request) -> bool:
    """A session question, or any request that is not the plugin's. Control
    requests (close, probe, offload) are foreground for ordering (one token
    someone waits for) but not questions: they must not make the scheduler
    pace ingestion as if questions were coming, or a feed that closes or
    probes sessions would ingest in short steps for ``active_window_s``."""
    tag = _tag(request)
    return tag is None or tag.op is Op.QUERY


class StatefulScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        cfg = SchedulingConfig.from_env()
        self.cost = StepCostModel(
            slack=cfg.foreground_slack,
            idle_factor=cfg.idle_step_factor,
            active_factor=cfg.active_step_factor,
            min_tokens=cfg.min_ingest_tokens,
            lag_target_s=cfg.ingest_lag_target_s,
            max_tokens=self.max_num_scheduled_tokens,
        )
        self.starve_steps = cfg.starve_steps
        self.active_window_s = cfg.active_window_s
        self._foreground_seen = float("-inf")
        self.steps = StepLog()
        self._step: Step | None = None  # the step the model is computing
        self._ingest_lag_s = 0.0  # as the last arrangement saw it
        self._trace = StepTrace.from_env()
        self._logged_at = 0.0
        attach = getattr(self.connector, "attach_step_log", None)
        if attach is not None:
            attach(self.steps)
        logger.info("vllm-stateful: request classes on (foreground > ingestion > flash)")

    # ---------------------------------------------------------------- hooks

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        self.steps.arrived(request.request_id, self.current_step)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        full_budget = self.max_num_scheduled_tokens
        full_active = self.max_num_active_reqs
        hidden_running, hidden_waiting, budget = self._arrange()
        self.max_num_scheduled_tokens = budget
        # Paused requests still hold a model-runner slot.
        self.max_num_active_reqs = full_active - len(hidden_running)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = full_budget
            self.max_num_active_reqs = full_active
            # Paused work goes last: the first preemption victims.
            self.running.extend(hidden_running)
            for request in hidden_waiting:
                self.waiting.add_request(request)
        self._record(output)
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any):
        now = time.monotonic()
        step, self._step = self._step, None
        if step is not None and scheduler_output.total_num_scheduled_tokens:
            self.cost.observe(now - step.started, step.prompt_tokens, step.decoding, step.prefilling)
            if self._trace is not None:
                self._trace.write(step, now)
            if now - self._logged_at > LOG_EVERY_S and self.cost.per_token_s:
                self._logged_at = now
                logger.info(
                    "vllm-stateful pacing: step %.1f ms + %.1f ms per decoding request "
                    "+ %.1f ms per prefilling request + %.2f ms per prompt token; ingestion "
                    "per step: %s beside one question, %d while questions come, %d otherwise",
                    1e3 * self.cost.fixed_s, 1e3 * (self.cost.per_decode_s or 0.0),
                    1e3 * self.cost.per_prefill_s, 1e3 * self.cost.per_token_s,
                    f"{self.cost.foreground_tokens(1)} tokens"
                    if self.cost.ingest_beside(1) else "none unless starved",
                    self.cost.idle_tokens(True), self.cost.idle_tokens(False),
                )
        return super().update_from_output(scheduler_output, model_runner_output)

    # ------------------------------------------------------------- arranging

    def _starved(self, request: Request) -> bool:
        """Passed over for ``starve_steps`` steps that carried foreground
        work. Steps it sat out by choice do not count: a flash evaluation
        run alone while ingestion keeps up would otherwise starve every
        stream's chunk at once, and they would then join the next
        question's steps one by one, a few tokens each at a full read of
        their stream's KV (+10-20 ms on a ~35 ms step at 16 streams)."""
        wait = self.steps.waits.get(request.request_id)
        return wait is not None and wait.starving >= self.starve_steps

    def _arrange(self) -> tuple[list[Request], list[Request], int]:
        """Order the queues by class and pick what sits this step out.
        Returns (hidden running, hidden waiting, token budget)."""
        lanes = {r.request_id: lane_of(r) for r in self.running}
        waiting = list(self.waiting)
        lanes.update((r.request_id, lane_of(r)) for r in waiting)
        foreground = any(lane is Lane.FOREGROUND for lane in lanes.values())
        now = time.monotonic()
        # Tags are parsed again only for foreground requests (this runs
        # every step, over every running and waiting request).
        if any(
            lanes[r.request_id] is Lane.FOREGROUND and is_question(r)
            for r in (*self.running, *waiting)
        ):
            self._foreground_seen = now
        # Flash work passed over too often goes first once, so it always
        # progresses even beside a steady stream of questions.
        starved = {
            r.request_id
            for r in (*self.running, *waiting)
            if lanes[r.request_id] is Lane.FLASH and self._starved(r)
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

        self.running.sort(key=rank)  # stable
        self._reorder_waiting(waiting, rank)

        first = [r for r in self.running if rank(r)[0] < Lane.INGEST]
        # The ingestion lag: how long the oldest data in the engine, running
        # or waiting, has waited since it was acknowledged.
        since = [
            data_since(r) for r in (*self.running, *waiting) if lanes[r.request_id] is Lane.INGEST
        ]
        waited = time.time() - min(since) if since else 0.0
        self._ingest_lag_s = waited
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
            ingest = (r for r in self.running if lanes[r.request_id] is Lane.INGEST)
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
            return not beside and not self._starved(r)

        cut: set[str] = set()
        allowance = 0
        if foreground:
            # A starved chunk beside questions gets the floor: its step is
            # one of theirs (a bigger chunk measured +75 ms on a 30 ms step).
            allowance = self.cost.foreground_tokens(len(first)) if beside else self.cost.min_tokens
        elif not waiting_first:
            # Questions seen lately: short ingestion steps, since one may
            # arrive any moment and wait for the step in flight; none for a
            # while: long ones, for throughput.
            active = now - self._foreground_seen < self.active_window_s
            chunks, queued = (
                [r for r in rs if lanes[r.request_id] is Lane.INGEST and not sits_out(r)]
                for rs in (self.running, sorted(waiting, key=rank))
            )
            allowance, cut = self._fill(first, chunks, queued, active, waited)

        hidden_running = [r for r in self.running if sits_out(r) or r.request_id in cut]
        hidden_waiting = [r for r in waiting if sits_out(r) or r.request_id in cut]
        if hidden_running:
            keep = set(map(id, hidden_running))
            self.running[:] = [r for r in self.running if id(r) not in keep]
        if hidden_waiting:
            self.waiting.remove_requests(hidden_waiting)
        if waiting_first:
            return hidden_running, hidden_waiting, self.max_num_scheduled_tokens
        budget = min(needs(first) + allowance, self.max_num_scheduled_tokens)
        return hidden_running, hidden_waiting, max(1, budget)

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

    def _reorder_waiting(self, waiting: list[Request], rank: Any) -> None:
        ordered = sorted(waiting, key=rank)
        if ordered != waiting:
            self.waiting.remove_requests(waiting)
            for request in ordered:
                self.waiting.add_request(request)

    # -------------------------------------------------------------- records

    def _record(self, output: SchedulerOutput) -> None:
        scheduled = output.num_scheduled_tokens
        drafts = output.scheduled_spec_decode_tokens
        step = Step(started=time.monotonic(), ingest_lag_s=self._ingest_lag_s)
        for req_id, n in scheduled.items():
            request = self.requests.get(req_id)
            if request is None:
                continue
            # A decode step schedules one token plus its speculative drafts
            # (verified in the same step); anything more is a prefill chunk.
            if n > 1 + len(drafts.get(req_id, ())):
                step.prompt_tokens += n
                step.prefilling += 1
            else:
                step.decoding += 1
            lane = lane_of(request)
            if lane is Lane.INGEST:
                step.ingest_tokens += n
            elif lane is Lane.FOREGROUND:
                step.foreground += 1
            if self._trace is not None:
                step.requests.append((int(lane), n, request.num_computed_tokens))
        running = {r.request_id for r in self.running}
        for req_id, wait in self.steps.waits.items():
            if req_id in scheduled:
                if wait.first_step is None:
                    wait.first_step = self.current_step
                wait.passed_over = wait.starving = 0
                wait.max_ingest_alongside = max(wait.max_ingest_alongside, step.ingest_tokens)
                continue
            if wait.first_step is None:
                wait.ingest_tokens_before += step.ingest_tokens
            elif req_id not in running:
                continue
            wait.passed_over += 1
            wait.starving += step.foreground > 0
        self._step = step if scheduled else None
