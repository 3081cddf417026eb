"""Capacity, the idle reference, and one load level, against one server."""

from __future__ import annotations

import asyncio
import bisect
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from livebench.plan import LevelPlan, LineIds, Question, window
from livebench.targets import (
    Asked,
    Handle,
    NeedRotation,
    StatefulTarget,
    StockTarget,
    Target,
)


async def sleep_until(clock, t: float) -> None:
    delay = t - clock()
    if delay > 0:
        await asyncio.sleep(delay)


def prefix_lines(source: LineIds, header: list[int], tokens: int, first: int) -> list[tuple[int, ...]]:
    out, n, pos = [], len(header), first
    while n < tokens:
        out.append(source[pos])
        n += len(source[pos])
        pos += 1
    return out


def flat(lines: Sequence[tuple[int, ...]]) -> list[int]:
    return [t for line in lines for t in line]


# ------------------------------------------------------------------ capacity


async def capacity(target: Target, source: LineIds, header: list[int], context: int,
                   tokens: int, reps: int, lines_per_append: int,
                   max_backlog: int, sessions: int = 1) -> dict[str, Any]:  # fmt: skip
    """Ingestion throughput (tokens/s) with no questions, each stream from
    ``context - tokens/2`` to ``context + tokens/2``: ``sessions`` streams
    fed at once, appends sent back to back (they are coalesced while one is
    being ingested), keeping each session's un-ingested tokens under half
    the server's backlog bound so that no append is refused, timed to the
    last ``ingested`` event. Several streams may ingest less than one (each
    stream's chunk in a step reads its own KV; measured on 2 cores: about
    the same at 16), which ``--capacity-by-sessions`` lets each level's load
    follow. Stock vLLM (no sessions):
    the prefill of ``tokens`` new tokens after a cached prefix (a 1-token
    completion)."""
    runs = []
    for rep in range(reps):
        first = 7919 * (rep + 1)
        if isinstance(target, StatefulTarget):
            runs.append(await _stateful_capacity(target, source, header, context, tokens,
                                                 lines_per_append, max_backlog, sessions,
                                                 first, rep))  # fmt: skip
        else:
            assert isinstance(target, StockTarget)
            pre = prefix_lines(source, header, context - tokens // 2, first)
            more = prefix_lines(source, [], tokens, first + len(pre))
            base = header + flat(pre)
            await target.warm_up(base)
            t0 = time.monotonic()
            await target.warm_up(base + flat(more))
            dt_s = time.monotonic() - t0
            n = len(flat(more))
            runs.append({"tokens": n, "seconds": dt_s, "tps": n / dt_s, "server_rate_tps": None})
        print(f"  capacity run {rep + 1}/{reps} ({sessions} session(s)): {runs[-1]['tokens']} "
              f"tokens in {runs[-1]['seconds']:.2f} s = {runs[-1]['tps']:.0f} tokens/s",
              flush=True)  # fmt: skip
    return {
        "tps": statistics.median(r["tps"] for r in runs),
        "context": context,
        "sessions": sessions,
        "runs": runs,
        "method": f"stateful appends back to back into {sessions} session(s) at once, to the "
        "last `ingested` event"
        if isinstance(target, StatefulTarget)
        else "stock vLLM: prefill of new tokens after a cached prefix (1-token completion)",
    }


async def _stateful_capacity(target: StatefulTarget, source: LineIds, header: list[int],
                             context: int, tokens: int, lines_per_append: int,
                             max_backlog: int, sessions: int, first: int,
                             rep: int) -> dict[str, Any]:  # fmt: skip
    feeds = []
    for s in range(sessions):
        start = first + s * 100_003
        pre = prefix_lines(source, header, context - tokens // 2, start)
        more = prefix_lines(source, [], tokens, start + len(pre))
        h = await target.open(-1 - s, rep, header + flat(pre), pre, None)
        feeds.append((h, more))
    for h, _ in feeds:
        if not await target.wait_ingested(h, 600):
            raise RuntimeError("capacity: a session's prefix was not ingested in 600 s")
    await asyncio.sleep(0.5)
    t0 = time.monotonic()

    async def feed(h: Handle, more: list[tuple[int, ...]]) -> int:
        sent = 0
        for i in range(0, len(more), lines_per_append):
            chunk = more[i : i + lines_per_append]
            # The engine stays busy: the next append is sent as soon as the
            # backlog has room for it.
            while len(h.context) - h.tokens_at.get(h.ingested_version(), 0) + len(
                    flat(chunk)) > max_backlog // 2:  # fmt: skip
                await asyncio.sleep(0.002)
            await target.append(h, flat(chunk), chunk, target.clock(), None)
            sent += len(flat(chunk))
        while h.ingested_version() < h.version:
            if time.monotonic() - t0 > 600:
                raise RuntimeError("capacity: the last append was not ingested in 600 s")
            await asyncio.sleep(0.005)
        return sent

    sent = sum(await asyncio.gather(*(feed(h, more) for h, more in feeds)))
    # The events' own times (client clock) are when they were seen.
    t1 = max(target.clock.t0 + h.ingested[-1][1] for h, _ in feeds)
    rates = [(await target.stats(h) or {}).get("ingest_rate_tps") for h, _ in feeds]
    for h, _ in feeds:
        await target.close(h)
    return {"tokens": sent, "seconds": t1 - t0, "tps": sent / (t1 - t0),
            "server_rate_tps": rates[0] if sessions == 1 else rates}  # fmt: skip


# -------------------------------------------------------------- idle reference


async def idle_reference(target: Target, source: LineIds, header: list[int],
                         contexts: Sequence[int], qs: Sequence[Question], reps: int,
                         first_line: int, max_append: int = 256) -> list[dict[str, Any]]:  # fmt: skip
    """Every question at each context on an idle engine, the feed paused and
    the data already ingested (stock vLLM: already in its prefix cache)."""
    pre = prefix_lines(source, header, contexts[0], first_line)
    h = await target.open(-1, 0, header + flat(pre), pre, None)
    pos = first_line + len(pre)
    out = []
    try:
        for c in contexts:
            while len(h.context) < c:
                chunk = []
                while (len(h.context) + len(flat(chunk)) < c and
                       len(flat(chunk)) + len(source[pos]) <= max_append):  # fmt: skip
                    chunk.append(source[pos])
                    pos += 1
                if isinstance(target, StatefulTarget):
                    await target.append_wait(h, flat(chunk), chunk)
                else:
                    await target.append(h, flat(chunk), chunk, 0.0, None)
            if isinstance(target, StockTarget):
                await target.warm_context(h)
            for _ in range(reps):
                for q in qs:
                    t0 = time.perf_counter()
                    ans = await target.ask(h, q, flash_ask=False)
                    e2e = time.perf_counter() - t0
                    out.append({"qid": q.id, "context": len(h.context), "e2e_s": e2e,
                                "text": ans.get("text")})  # fmt: skip
            mine = [r["e2e_s"] for r in out if r["context"] == len(h.context)]
            print(f"  idle at {len(h.context)} tokens: p50 {statistics.median(mine) * 1e3:.0f} ms",
                  flush=True)  # fmt: skip
    finally:
        await target.close(h)
    return out


def idle_at(idle: list[dict[str, Any]], qid: str, context: int) -> float | None:
    """Idle latency of ``qid`` at ``context``: the medians per measured
    context, interpolated linearly (clamped at the ends)."""
    by_ctx: dict[int, list[float]] = {}
    for r in idle:
        if r["qid"] == qid:
            by_ctx.setdefault(r["context"], []).append(r["e2e_s"])
    if not by_ctx:
        return None
    xs = sorted(by_ctx)
    ys = [statistics.median(by_ctx[x]) for x in xs]
    if context <= xs[0]:
        return ys[0]
    if context >= xs[-1]:
        return ys[-1]
    i = bisect.bisect_right(xs, context)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return y0 + (y1 - y0) * (context - x0) / (x1 - x0)


# ---------------------------------------------------------------- one level


@dataclass
class LevelConfig:
    start_context: int
    rotate_at: int  # a slot moves to a new session before passing this
    max_append_tokens: int  # a late feeder coalesces due appends up to this
    question_timeout_s: float
    drain_timeout_s: float
    stats_interval_s: float
    progress_s: float
    flash: dict | None  # flash query spec registered on every session


@dataclass
class LevelRecord:
    engine: str
    sessions: int
    load: float
    offered_tps: float
    duration_s: float
    planned_appends: int
    planned_tokens: int
    acks: list[dict] = field(default_factory=list)
    asked: list[dict] = field(default_factory=list)
    lags: list[dict] = field(default_factory=list)  # per acknowledged append
    backlog: list[dict] = field(default_factory=list)  # (t, client, server) over all sessions
    verification: list[dict] = field(default_factory=list)
    rotations: int = 0
    unsent_tokens: int = 0
    drain_s: float | None = None
    wall_s: float = 0.0
    setup_s: float = 0.0
    errors: list[str] = field(default_factory=list)
    # time.monotonic() at the level's start: record times are from here.
    t0_monotonic: float = 0.0


async def run_level(target: Target, plan: LevelPlan, cfg: LevelConfig,
                    qs: dict[str, Question], label: str) -> LevelRecord:  # fmt: skip
    clock = target.clock
    D = plan.duration_s
    rec = LevelRecord(target.label, plan.sessions, plan.load, plan.offered_tps, D,
                      sum(len(a) for a in plan.appends), plan.planned_tokens)  # fmt: skip
    stateful = isinstance(target, StatefulTarget)
    t_setup = time.monotonic()
    clock.reset()
    handles: list[Handle] = list(await asyncio.gather(*(
        target.open(s, 0, plan.prefix_ids(s), plan.prefix_lines[s], cfg.flash)
        for s in range(plan.sessions)
    )))  # fmt: skip
    all_handles: list[Handle] = list(handles)
    rec.setup_s = time.monotonic() - t_setup
    retiring: list[asyncio.Task] = []
    question_tasks: set[asyncio.Task] = set()
    done_questions: list[Asked] = []
    n_429 = [0]
    clock.reset()  # the level starts now: every schedule time is from here
    rec.t0_monotonic = clock.t0

    async def verify(h: Handle) -> None:
        st = await target.stats(h)
        if st is None:
            return
        expected = h.prefix_tokens + h.acked_tokens
        rec.verification.append({
            "slot": h.slot, "generation": h.generation, "prefix_tokens": h.prefix_tokens,
            "acknowledged_tokens": h.acked_tokens, "acknowledged_appends": len(h.acks),
            "expected_tokens": expected, "session_tokens": st.get("tokens"),
            "session_version": st.get("version"), "acknowledged_version": h.version,
            # Still un-ingested when the session was closed (rotation, end).
            "backlog_tokens_at_close": st.get("backlog_tokens"),
            "ok": st.get("tokens") == expected and st.get("version") == h.version,
        })  # fmt: skip

    async def retire(h: Handle) -> None:
        while h.inflight:
            await asyncio.sleep(0.05)
        await verify(h)
        await target.close(h)

    async def rotate(slot: int) -> Handle:
        old = handles[slot]
        ids = window(plan.header, old.lines, cfg.start_context)
        n_lines = 0
        total = len(plan.header)
        for line in reversed(old.lines):  # the same lines ``window`` kept
            if total + len(line) > cfg.start_context:
                break
            total += len(line)
            n_lines += 1
        lines = old.lines[len(old.lines) - n_lines :] if n_lines else []
        new = await target.open(slot, old.generation + 1, ids, lines, cfg.flash)
        handles[slot] = new
        all_handles.append(new)
        rec.rotations += 1
        retiring.append(asyncio.create_task(retire(old)))
        return new

    async def feeder(slot: int) -> None:
        plan_a = plan.appends[slot]
        i = 0
        while i < len(plan_a):
            await sleep_until(clock, plan_a[i].t)
            if clock() >= D:
                break
            now = clock()
            batch = [plan_a[i]]
            j = i + 1
            # Behind schedule (a 429, a slow acknowledgement): what is due
            # goes in one request, as a feed client would send it.
            while (j < len(plan_a) and plan_a[j].t <= now and
                   sum(a.tokens for a in batch) + plan_a[j].tokens <= cfg.max_append_tokens):  # fmt: skip
                batch.append(plan_a[j])
                j += 1
            lines = [line for a in batch for line in a.lines]
            ids = flat(lines)
            h = handles[slot]
            if len(h.context) + len(ids) > cfg.rotate_at:
                h = await rotate(slot)
            try:
                ack = await target.append(h, ids, lines, batch[0].t, D)
            except NeedRotation:
                h = await rotate(slot)
                ack = await target.append(h, ids, lines, batch[0].t, D)
            if ack is None:  # the run ended while the append was refused
                break
            n_429[0] += ack.retries
            i = j
        rec.unsent_tokens += sum(a.tokens for a in plan_a[i:])

    async def ask_one(pq) -> None:
        h = handles[pq.slot]
        q = qs[pq.qid]
        h.inflight += 1
        a = Asked(pq.slot, h.generation, pq.qid, pq.t, clock(), None, None, len(h.context),
                  acked_version=h.version)  # fmt: skip
        t0 = time.perf_counter()
        try:
            ans = await target.ask(h, q, flash_ask=q.flash)
            a.e2e_s = time.perf_counter() - t0
            a.context = ans.get("context")
            a.version, a.flash = ans.get("version"), ans.get("flash")
            a.staleness_ms, a.computed_tokens = ans.get("staleness_ms"), ans.get("computed_tokens")
            a.text = ans.get("text")
            if a.flash and a.staleness_ms is None and a.version is not None:
                # Client-side estimate: since the first newer version was
                # ingested (0 when the answer's version is the newest).
                newer = [t for v, t, _ in h.ingested if v > a.version and t <= a.t_start]
                a.staleness_ms = (a.t_start - newer[0]) * 1e3 if newer else 0.0
        except Exception as exc:  # recorded; the level goes on
            a.error = f"{type(exc).__name__}: {exc}"[:300]
        finally:
            h.inflight -= 1
        done_questions.append(a)

    async def dispatcher() -> None:
        for pq in plan.questions:
            await sleep_until(clock, pq.t)
            task = asyncio.create_task(ask_one(pq))
            question_tasks.add(task)

    def client_backlogs() -> list[int]:
        out = []
        for h in handles:
            v = h.ingested_version() if stateful else h.version
            done = max((n for ver, n in h.tokens_at.items() if ver <= v), default=h.prefix_tokens)
            out.append(len(h.context) - done)
        return out

    def client_backlog() -> int:
        return sum(client_backlogs())

    async def poller() -> None:
        while True:
            server = server_max = None
            if stateful:
                sts = await asyncio.gather(*(target.stats(h) for h in list(handles)))
                vals = [st.get("backlog_tokens") for st in sts if st]
                if vals and all(v is not None for v in vals):
                    server, server_max = sum(vals), max(vals)
            mine = client_backlogs()
            rec.backlog.append({"t": clock(), "client_tokens": sum(mine),
                                "client_max_session_tokens": max(mine, default=0),
                                "server_tokens": server, "server_max_session_tokens": server_max})  # fmt: skip
            await asyncio.sleep(cfg.stats_interval_s)

    async def progress() -> None:
        while True:
            await asyncio.sleep(cfg.progress_s)
            ok = sorted(q.e2e_s for q in done_questions if q.e2e_s is not None)
            p50 = f"{ok[len(ok) // 2] * 1e3:.0f} ms" if ok else "-"
            acked = sum(len(h.acks) for h in all_handles)
            print(f"  [{label}] {clock():5.0f}/{D:.0f} s  appends {acked}/{rec.planned_appends}  "
                  f"429s {n_429[0]}  backlog {client_backlog()} tokens  questions "
                  f"{len(done_questions)}/{len(plan.questions)} p50 {p50}", flush=True)  # fmt: skip

    side = [asyncio.create_task(poller()), asyncio.create_task(progress())]
    feeders = [asyncio.create_task(feeder(s)) for s in range(plan.sessions)]
    disp = asyncio.create_task(dispatcher())
    try:
        for task in asyncio.as_completed([*feeders, disp]):
            try:
                await task
            except Exception as exc:
                rec.errors.append(f"{type(exc).__name__}: {exc}"[:300])
        if question_tasks:
            _, pending = await asyncio.wait(question_tasks, timeout=cfg.question_timeout_s)
            for t in pending:
                t.cancel()
            if pending:
                rec.errors.append(f"{len(pending)} questions unanswered after "
                                  f"{cfg.question_timeout_s:.0f} s past the end")  # fmt: skip
        # Drain: how long the backlog takes to be ingested once the feed stops.
        t_end = clock()
        drained = all(await asyncio.gather(
            *(target.wait_ingested(h, cfg.drain_timeout_s) for h in handles)))  # fmt: skip
        rec.drain_s = (clock() - t_end) if drained else None
        if retiring:
            await asyncio.gather(*retiring, return_exceptions=True)
        if stateful:
            for h in handles:
                await verify(h)
    finally:
        for t in side:
            t.cancel()
        for h in handles:
            if not h.closed:
                try:
                    await target.close(h)
                except Exception as exc:
                    rec.errors.append(f"close: {exc}"[:200])
    rec.wall_s = clock()
    # Append acknowledged -> the first ``ingested`` event covering it.
    for h in all_handles:
        vers = [v for v, _, _ in h.ingested]
        for ack in h.acks:
            i = bisect.bisect_left(vers, ack.version)
            lag = server_lag = None
            if i < len(vers):
                lag = h.ingested[i][1] - ack.t_ack
                server_lag = h.ingested[i][2].get("lag_s")
            rec.lags.append({"slot": ack.slot, "t_ack": ack.t_ack, "lag_s": lag,
                             "server_lag_s": server_lag, "tokens": ack.tokens})  # fmt: skip
        rec.acks += [asdict(a) for a in h.acks]
    rec.asked = [asdict(q) for q in sorted(done_questions, key=lambda q: q.t_sched)]
    return rec
