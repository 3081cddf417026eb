"""Replays one workload's plans against one engine row and records it all."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from marketbench.drivers import Driver, FullPromptDriver, Handle, SessionDriver
from marketbench.results import AppendRecord, ChurnRecord, QueryRecord, Results, RunRecord
from marketbench.servers import Server, prefix_cache_counters
from marketbench.workloads import SessionPlan, Workload


class Clock:
    """Seconds since the current workload run started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def reset(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


@dataclass(frozen=True)
class ChurnConfig:
    """Background stateless traffic: random prompts arriving as a Poisson
    process, as other tenants of a shared server send them."""

    interval_s: float = 2.0  # mean time between requests
    prompt_tokens: int = 1024
    max_inflight: int = 2  # beyond this, arrivals are dropped (and counted)


async def _sleep_until(t: float) -> None:
    delay = t - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


class Churn:
    def __init__(self, driver: Driver, cfg: ChurnConfig, tokenizer: Any, seed: str,
                 row: str, workload: str, clock: Clock):  # fmt: skip
        self.driver, self.cfg, self.tok, self.clock = driver, cfg, tokenizer, clock
        self.rng = random.Random(seed)
        self.row, self.workload = row, workload
        self.records: list[ChurnRecord] = []
        self.sent = self.skipped = 0
        self.inflight: set[asyncio.Task] = set()
        self.vocab = len(tokenizer)
        # Random ids, clear of the special tokens at the start of the vocab.
        self.lo = min(1000, self.vocab // 8)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.rng.expovariate(1.0 / self.cfg.interval_s))
            ids = [self.rng.randrange(self.lo, self.vocab) for _ in range(self.cfg.prompt_tokens)]
            if len(self.inflight) >= self.cfg.max_inflight:
                self.skipped += 1
                continue
            self.sent += 1
            task = asyncio.create_task(self._one(ids))
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

    async def _one(self, ids: list[int]) -> None:
        t = self.clock()
        start = time.perf_counter()
        try:
            await self.driver.stateless(ids, self.tok.decode(ids))
            self.records.append(
                ChurnRecord(self.row, self.workload, t, len(ids), time.perf_counter() - start)
            )
        except Exception as exc:  # recorded; churn must not stop the run
            self.records.append(ChurnRecord(self.row, self.workload, t, len(ids), None, repr(exc)))

    async def stop(self) -> None:
        for task in list(self.inflight):
            task.cancel()
        await asyncio.gather(*self.inflight, return_exceptions=True)


async def run_workload(
    *,
    driver: Driver,
    workload: Workload,
    plans: list[SessionPlan],
    server: Server,
    http: httpx.AsyncClient,
    clock: Clock,
    question_ids: dict[str, list[int]],
    tokenizer: Any,
    churn: ChurnConfig,
    seed: int,
    results: Results,
    on_answer: Callable[[QueryRecord], None],
) -> RunRecord:
    row = driver.row
    before = await prefix_cache_counters(http)
    if server.memory is not None:
        server.memory.reset()
    clock.reset()
    handles: list[Handle] = list(await asyncio.gather(*(driver.open(p) for p in plans)))
    churner = None
    churn_task = None
    if workload.churn:
        churner = Churn(
            driver, churn, tokenizer, f"{seed}-{workload.name}-churn", row, workload.name, clock
        )
        churn_task = asyncio.create_task(churner.run())

    queries: list[QueryRecord] = []

    async def session_loop(h: Handle) -> None:
        plan = h.plan
        await asyncio.sleep(plan.start_delay_s)
        next_t = time.perf_counter()
        for k, step in enumerate(plan.steps):
            await _sleep_until(next_t)
            await driver.append(h, step)
            base = time.perf_counter()
            # Closed loop: the next append comes one interval after this one,
            # or at once if answering took longer.
            next_t = base + plan.interval_s
            for j, ask in sorted(enumerate(step.asks), key=lambda x: x[1].offset):
                await _sleep_until(base + ask.offset * plan.interval_s)
                ids = question_ids[ask.question.id]
                rec = QueryRecord(
                    row=row, workload=workload.name, session=plan.index, step=k, ask=j,
                    question=ask.question.id, bucket=ask.bucket, context=len(h.context_ids),
                    prompt_tokens=len(h.context_ids) + len(ids), t=clock(), e2e_s=0.0,
                )  # fmt: skip
                try:
                    a = await driver.ask(h, ask, ids)
                    rec.e2e_s, rec.ttft_s, rec.text = a.e2e_s, a.ttft_s, a.text
                    rec.completion_tokens, rec.computed_tokens = (
                        a.completion_tokens,
                        a.computed_tokens,
                    )
                    rec.flash, rec.flash_wait_s, rec.server_s = a.flash, a.flash_wait_s, a.server_s
                    rec.pending_ingest = a.pending_ingest
                except Exception as exc:  # recorded with the question; the run goes on
                    rec.error = repr(exc)[:500]
                queries.append(rec)
                on_answer(rec)

    try:
        await asyncio.gather(*(session_loop(h) for h in handles))
    finally:
        if churn_task is not None:
            churn_task.cancel()
            await asyncio.gather(churn_task, return_exceptions=True)
            await churner.stop()
    wall = clock()
    notes: list[str] = []
    if driver.qset.ignore_eos:
        short = [q for q in queries if q.error is None and q.completion_tokens < driver.max_tokens]
        if short:
            notes.append(f"{len(short)} answers shorter than {driver.max_tokens} tokens")
    if isinstance(driver, FullPromptDriver) and driver.text_prompts:
        last = _last_ask(handles[0])
        if last is not None:
            ok = await driver.text_tokens_match(handles[0], last, question_ids[last.question.id])
            if ok is not None:
                notes.append(
                    "server tokenization of the text prompts equals the token log"
                    if ok
                    else "server tokenizes the text prompts differently from the token log"
                )
    stats = await asyncio.gather(*(driver.close(h) for h in handles))
    after = await prefix_cache_counters(http)

    pinned = None
    if isinstance(driver, SessionDriver):
        pinned = sum(int(s.get("pinned_tokens", 0)) for s in stats)
        for h in handles:
            for version, tokens, sent in h.appended:
                done = [t for v, t in h.ingested if v >= version]
                results.appends.append(AppendRecord(
                    row, workload.name, h.plan.index, version, tokens, sent, min(done) if done else None
                ))  # fmt: skip
    results.queries.extend(queries)
    if churner is not None:
        results.churn.extend(churner.records)
    run = RunRecord(
        row=row,
        workload=workload.name,
        wall_s=wall,
        questions=sum(p.num_asks for p in plans),
        answered=sum(1 for q in queries if q.error is None),
        stream_tokens=sum(len(s.tokens) for p in plans for s in p.steps),
        peak_rss_bytes=server.memory.peak_bytes if server.memory is not None else 0,
        pinned_tokens=pinned,
        churn_sent=churner.sent if churner else 0,
        churn_skipped=churner.skipped if churner else 0,
        notes=notes,
    )
    if before is not None and after is not None:
        run.prefix_cache_queries = (
            after["vllm:prefix_cache_queries_total"] - before["vllm:prefix_cache_queries_total"]
        )
        run.prefix_cache_hits = (
            after["vllm:prefix_cache_hits_total"] - before["vllm:prefix_cache_hits_total"]
        )
    results.runs.append(run)
    return run


def _last_ask(h: Handle):
    for step in reversed(h.plan.steps):
        if step.asks:
            return step.asks[-1]
    return None
