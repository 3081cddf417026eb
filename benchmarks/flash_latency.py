"""Flash queries, measured over HTTP against one `vllm-stateful serve`.

1. Flash hit vs normal session query on the same session: server-side
   latency (the ``Server-Timing`` header) p50/p99, and client-side.
2. Append -> flash push: from the append's 202 to the ``flash`` event for
   that version on the SSE stream, the engine otherwise idle.
3. Cost to foreground traffic: query p50 on a streaming session (ticks
   appended every ``--append-every`` s) with 0 and with 8 flash queries.

    python benchmarks/flash_latency.py                 # SmolLM2
    python benchmarks/flash_latency.py --model tiny --hits 20 --eager
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from marketbench.servers import Server, free_port  # noqa: E402

from vllm_stateful.client import connection_limits

RESULTS = Path(__file__).parent / "results"
HEADER = "E-mini S&P 500 futures trades (time price size):\n"
QUESTION = "\nQuestion: what was the last traded price?\nAnswer:"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]


def server_ms(r: httpx.Response) -> float:
    return float(r.headers["server-timing"].split("dur=")[1])


class Api:
    def __init__(self, http: httpx.AsyncClient):
        self.http = http

    async def create(self, prefix: str) -> tuple[str, dict]:
        r = await self.http.post("/v1/sessions", json={"prefix": prefix})
        r.raise_for_status()
        return r.json()["id"], {"X-Session-Token": r.json()["token"]}

    async def append(self, sid: str, h: dict, text: str, wait: bool = False) -> int:
        r = await self.http.post(f"/v1/sessions/{sid}/append", params={"wait": "true"} if wait else {},
                                 json={"text": text}, headers=h)
        r.raise_for_status()
        return r.json()["version"]

    async def ask(self, sid: str, h: dict, prompt: str, max_tokens: int) -> tuple[httpx.Response, float]:
        start = time.perf_counter()
        r = await self.http.post(f"/v1/sessions/{sid}/completions", headers=h, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()
        return r, time.perf_counter() - start

    async def flash(self, sid: str, h: dict, prompt: str, max_tokens: int) -> None:
        r = await self.http.post(f"/v1/sessions/{sid}/flash", headers=h, json={
            "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
        r.raise_for_status()


async def flash_events(http: httpx.AsyncClient, sid: str, h: dict, queue: asyncio.Queue) -> None:
    async with http.stream("GET", f"/v1/sessions/{sid}/events", headers=h) as r:
        async for line in r.aiter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                if event["type"] == "flash":
                    await queue.put((time.perf_counter(), event))


def tick_text(lines, n_tokens: int, tok) -> str:
    out, count = [], 0
    while count < n_tokens:
        line = next(lines)
        out.append(line)
        count += len(tok.encode(line, add_special_tokens=False))
    return "".join(out)


async def run(args, tok) -> dict:
    from vllm_stateful.feeds import tick_lines

    lines = tick_lines()
    out: dict = {}
    limits = connection_limits()
    async with httpx.AsyncClient(base_url=args.base_url, timeout=600, limits=limits) as http:
        api = Api(http)
        sid, h = await api.create(HEADER)
        await api.append(sid, h, tick_text(lines, args.context, tok), wait=True)
        pushes: asyncio.Queue = asyncio.Queue()
        listener = asyncio.create_task(flash_events(http, sid, h, pushes))
        await asyncio.sleep(0.5)  # subscribed
        await api.flash(sid, h, QUESTION, args.max_tokens)
        await pushes.get()

        print("[1/3] flash hit vs normal query", file=sys.stderr, flush=True)
        hit_server, hit_client = [], []
        for _ in range(args.hits):
            r, e2e = await api.ask(sid, h, QUESTION, args.max_tokens)
            assert r.json()["session"]["flash"], r.json()
            hit_server.append(server_ms(r))
            hit_client.append(e2e * 1e3)
        q_server, q_client = [], []
        for i in range(args.queries):
            r, e2e = await api.ask(sid, h, QUESTION.replace("Question", f"Question {i}"), args.max_tokens)
            assert not r.json()["session"]["flash"]
            q_server.append(server_ms(r))
            q_client.append(e2e * 1e3)
        out["hit"] = summary(hit_server, hit_client)
        out["query"] = summary(q_server, q_client)
        out["context_tokens"] = r.json()["usage"]["prompt_tokens"]

        print("[2/3] append -> flash push", file=sys.stderr, flush=True)
        lags = []
        for _ in range(args.rounds):
            text = tick_text(lines, args.append_tokens, tok)
            start = time.perf_counter()
            version = await api.append(sid, h, text)
            acked = time.perf_counter()
            while True:
                at, event = await pushes.get()
                if event["version"] >= version:
                    break
            lags.append((at - acked) * 1e3)
            del start
        out["push_lag_ms"] = {"p50": statistics.median(lags), "p90": pct(lags, 0.9), "n": len(lags)}
        listener.cancel()
        await http.delete(f"/v1/sessions/{sid}", headers=h)

        print("[3/3] foreground cost of flash work", file=sys.stderr, flush=True)
        out["foreground"] = {}
        for n_flash in (0, 8):
            out["foreground"][n_flash] = await foreground(api, args, tok, lines, n_flash)
    return out


async def foreground(api: Api, args, tok, lines, n_flash: int) -> dict:
    sid, h = await api.create(HEADER)
    await api.append(sid, h, tick_text(lines, args.context, tok), wait=True)
    for i in range(n_flash):
        await api.flash(sid, h, QUESTION.replace("Question", f"Flash question {i}"), args.max_tokens)
    stop = asyncio.Event()

    async def appender() -> None:
        while not stop.is_set():
            await api.append(sid, h, tick_text(lines, args.append_tokens, tok))
            await asyncio.sleep(args.append_every)

    task = asyncio.create_task(appender())
    lat = []
    for i in range(args.queries):
        _, e2e = await api.ask(sid, h, QUESTION.replace("Question", f"Foreground {i}"), args.max_tokens)
        lat.append(e2e * 1e3)
        await asyncio.sleep(0.1)
    stop.set()
    await task
    await api.http.delete(f"/v1/sessions/{sid}", headers=h)
    return {"p50_ms": statistics.median(lat), "p90_ms": pct(lat, 0.9), "n": len(lat)}


def summary(server: list[float], client: list[float]) -> dict:
    return {
        "server_p50_ms": statistics.median(server), "server_p99_ms": pct(server, 0.99),
        "client_p50_ms": statistics.median(client), "client_p99_ms": pct(client, 0.99),
        "n": len(server),
    }  # fmt: skip


def markdown(res: dict, args) -> str:
    h, q, fg = res["hit"], res["query"], res["foreground"]
    return "\n".join([
        f"Model {args.model} ({'eager' if args.eager else 'compiled'}), one `vllm-stateful serve`, "
        f"{os.cpu_count()} cores ({platform.machine()}); session of {res['context_tokens']} tokens, "
        f"{args.max_tokens}-token greedy answers.",
        "",
        "| measure | p50 (ms) | p99 / p90 (ms) |",
        "|---|---|---|",
        f"| flash hit, server side ({h['n']}) | {h['server_p50_ms']:.2f} | p99 {h['server_p99_ms']:.2f} |",
        f"| flash hit, client over loopback HTTP | {h['client_p50_ms']:.2f} | p99 {h['client_p99_ms']:.2f} |",
        f"| normal session query, server side ({q['n']}) | {q['server_p50_ms']:.1f} | p99 {q['server_p99_ms']:.1f} |",
        f"| append ack -> flash pushed (idle engine) | {res['push_lag_ms']['p50']:.1f} | p90 {res['push_lag_ms']['p90']:.1f} |",
        f"| foreground query, streaming session, 0 flash queries | {fg[0]['p50_ms']:.1f} | p90 {fg[0]['p90_ms']:.1f} |",
        f"| foreground query, streaming session, 8 flash queries | {fg[8]['p50_ms']:.1f} | p90 {fg[8]['p90_ms']:.1f} |",
        "",
        f"Flash hit vs normal query (server side, p50): {q['server_p50_ms'] / h['server_p50_ms']:.0f}x faster. "
        f"Foreground p50 with 8 flash queries / with 0: {fg[8]['p50_ms'] / fg[0]['p50_ms']:.2f}x.",
        "",
        f"Command: `python benchmarks/flash_latency.py {' '.join(sys.argv[1:])}`",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model folder")
    ap.add_argument("--context", type=int, default=2000, help="session tokens before measuring")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--hits", type=int, default=200)
    ap.add_argument("--queries", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--append-tokens", type=int, default=64)
    ap.add_argument("--append-every", type=float, default=0.5)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "flash"))
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from vllm_stateful import models

    path = {"smollm2": models.prepare_smollm2, "tiny": models.tiny_model}.get(args.model, lambda: args.model)()
    port = free_port()
    argv = [str(Path(sys.executable).with_name("vllm-stateful")), "serve", path, "--port", str(port),
            "--host", "127.0.0.1", "--max-model-len", "8192", "--disable-uvicorn-access-log"]
    if args.eager:
        argv.append("--enforce-eager")
    if args.model == "tiny":
        argv += ["--dtype", "float32"]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4")}
    log = Path(args.out).with_suffix(".server.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    server = Server(argv, env, port, "/health", log)
    print(f"starting {' '.join(argv)}", file=sys.stderr, flush=True)
    server.start(timeout_s=900)
    try:
        args.base_url = f"http://127.0.0.1:{port}"
        res = asyncio.run(run(args, AutoTokenizer.from_pretrained(path)))
    finally:
        server.stop()
    md = markdown(res, args)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("out", "base_url")}, **res}, indent=1, default=str))
    Path(args.out).with_suffix(".md").write_text(md + "\n")
    log.unlink(missing_ok=True)
    print(md)


if __name__ == "__main__":
    main()
