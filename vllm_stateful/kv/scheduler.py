"""The engine-side scheduler: vLLM's v1 ``Scheduler`` with request classes.

Three classes of work (``lanes.py``), in this order:

* foreground: session questions and every request that is not the plugin's
  (stateless OpenAI traffic is foreground too), plus the one-token control
  requests;
* ingestion: a session's appends (``Op.APPEND``);
* flash: background evaluations of registered questions (``Op.FLASH``).

vLLM's ``priority`` policy cannot express this: it orders only the waiting
queue, a waiting request never preempts, and running requests take the token
budget first, so a question would still wait behind a running prefill. This
subclass does not copy vLLM's ``schedule``; before each call it arranges what
vLLM's scheduler sees (``arrange.py``: order, what sits the step out, the
token budget) and restores it afterwards.

Step records (``steps.py``) say what every request waited for; the connector
reports them when the request finishes. Every step's time feeds the step-cost
fit (``pacing.py``) the arrangement is sized by.
``VLLM_STATEFUL_STEP_TRACE=<file>`` writes every step as a JSON line.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler

from vllm_stateful.config import SchedulingConfig
from vllm_stateful.kv.arrange import Arrangement, Arranger
from vllm_stateful.kv.lanes import Lane, lane_of
from vllm_stateful.kv.pacing import StepCostModel
from vllm_stateful.kv.steps import Step, StepLog, StepTrace

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

# Under "vllm." so vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")

LOG_EVERY_S = 60.0  # how often the measured step costs are logged


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
        self.steps = StepLog()
        self.arranger = Arranger(cfg, self.cost, self.steps)
        self._step: Step | None = None  # the step the model is computing
        self._trace = StepTrace.from_env()
        self._logged_at = 0.0
        attach = getattr(self.connector, "attach_step_log", None)
        if attach is not None:
            attach(self.steps)
        # Each step's time, for the engine's busy share on /metrics.
        self._record_step = getattr(self.connector, "record_step", None)
        # Pins an append's data once its prompt is computed (a flash
        # question riding it is still to be answered).
        self._prompt_computed = getattr(self.connector, "prompt_computed", None)
        logger.info("vllm-stateful: request classes on (foreground > ingestion > flash)")

    # ---------------------------------------------------------------- hooks

    def add_request(self, request: Request) -> None:
        super().add_request(request)
        self.steps.arrived(request.request_id, self.current_step)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        full_budget = self.max_num_scheduled_tokens
        full_active = self.max_num_active_reqs
        waiting = list(self.waiting)
        plan = self.arranger.arrange(self.running, waiting, full_budget)
        self.running[:] = plan.running
        if plan.waiting != waiting:
            self.waiting.remove_requests(waiting)
            for request in plan.waiting:
                self.waiting.add_request(request)
        self.max_num_scheduled_tokens = plan.budget
        # Paused requests still hold a model-runner slot.
        self.max_num_active_reqs = full_active - len(plan.hidden_running)
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.max_num_scheduled_tokens = full_budget
            self.max_num_active_reqs = full_active
            # Paused work goes last: the first preemption victims.
            self.running.extend(plan.hidden_running)
            for request in plan.hidden_waiting:
                self.waiting.add_request(request)
        self._record(output, plan)
        return output

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any):
        now = time.monotonic()
        step, self._step = self._step, None
        if step is not None and scheduler_output.total_num_scheduled_tokens:
            took = now - step.started
            self.cost.observe(took, step.prompt_tokens, step.decoding, step.prefilling)
            if self._record_step is not None:
                self._record_step(took)
            if self._trace is not None:
                self._trace.write(step, now)
            if now - self._logged_at > LOG_EVERY_S and self.cost.fitted:
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
        if self._prompt_computed is not None:
            # Before vLLM processes the outputs: a request that finishes in
            # this step is freed there, and its blocks with it.
            for req_id, n in scheduler_output.num_scheduled_tokens.items():
                request = self.requests.get(req_id)
                if request is not None and (
                    request.num_computed_tokens - n
                    < request.num_prompt_tokens
                    <= request.num_computed_tokens
                ):
                    self._prompt_computed(request)
        return super().update_from_output(scheduler_output, model_runner_output)

    # -------------------------------------------------------------- records

    def _record(self, output: SchedulerOutput, plan: Arrangement) -> None:
        scheduled = output.num_scheduled_tokens
        drafts = output.scheduled_spec_decode_tokens
        step = Step(started=time.monotonic(), ingest_lag_s=plan.ingest_lag_s)
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
            # The arrangement classified what was running or waiting; only a
            # request from vLLM's queue of KV-holding waiters is parsed here.
            lane = plan.lanes.get(req_id)
            if lane is None:
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
