"""What the HTTP layer costs: a session query over HTTP vs the library call.

One process runs vLLM's OpenAI server with the session plugin (built the way
``vllm-stateful serve`` builds it, served by uvicorn on 127.0.0.1) and keeps
a handle on the plugin's ``StatefulEngine``, so both paths query the *same*
session on the same engine, interleaved round by round:

* ``library``: ``StatefulEngine.query`` (and ``query_stream`` for TTFT);
* ``http``: ``POST /v1/sessions/{id}/completions`` (and with ``stream``);
* ``stateless question``: ``POST /v1/completions`` with the question alone,
  no session (the stock handler, behind the plugin's delegating route): the
  floor a client pays for any request of that size.

Every answer is ``--max-tokens`` greedy tokens with ``ignore_eos``; questions
are sent as token ids, a new numbered question per request, so every path
computes the same number of tokens.
The HTTP client runs in the server's own event loop (one process), so the
numbers include the client's share of the loop as a separate client process
would not; on 2 cores a second process would compete for the CPU instead.

    python benchmarks/http_overhead.py                    # tiny model, quick
    python benchmarks/http_overhead.py --model smollm2 --context 2000 --reps 30
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

RESULTS = Path(__file__).parent / "results"
HEADER = "E-mini S&P 500 futures trades (time price size):\n"
# Numbered so that no two requests share a question: a repeated question
# would be served partly from the prefix cache (its full blocks), and the
# paths would no longer compute the same tokens.
QUESTION = "\nQuestion {n}: what was the last traded price?\nAnswer:"


@dataclass
class Series:
    name: str
    e2e_s: list[float] = field(default_factory=list)
    ttft_s: list[float] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        def q(xs: list[float], p: float) -> float | None:
            if not xs:
                return None
            xs = sorted(xs)
            return xs[min(len(xs) - 1, round(p * (len(xs) - 1)))]

        return {
            "name": self.name,
            "e2e_p50_ms": _ms(q(self.e2e_s, 0.5)),
            "e2e_p90_ms": _ms(q(self.e2e_s, 0.9)),
            "ttft_p50_ms": _ms(q(self.ttft_s, 0.5)),
            "computed_tokens_p50": statistics.median(self.computed) if self.computed else None,
        }


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 2)


def _synthetic_ticks() -> Iterator[str]:
    for i in itertools.count():
        clock = f"09:{30 + i // 3600 % 30:02d}:{i // 60 % 60:02d}.{i % 1000:03d}"
        yield f"{clock} {1651.25 + (i % 7) * 0.25:.2f} {1 + i % 9}\n"


def tick_text(tokenizer, n_tokens: int) -> list[str]:
    """Tick lines totalling about ``n_tokens``: real trades when ``mlfinpy``
    is installed, otherwise synthetic lines of the same shape."""
    try:
        from vllm_stateful.feeds import tick_lines

        real = tick_lines()
        lines: Iterator[str] = itertools.chain([next(real)], real)
    except (ImportError, FileNotFoundError):
        lines = _synthetic_ticks()
    out, total = [], 0
    while total < n_tokens:
        out.append(next(lines))
        total += len(tokenizer.encode(out[-1], add_special_tokens=False))
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_args(args: argparse.Namespace, port: int):
    """Parsed and completed exactly as ``vllm-stateful serve`` does it."""
    from vllm_stateful.cli import _parser, prepare_args

    argv = [
        args.model_path, "--host", "127.0.0.1", "--port", str(port), "--dtype", args.dtype,
        "--max-model-len", str(args.max_model_len), "--block-size", "32",
        "--num-gpu-blocks-override", str(args.num_blocks), "--disable-uvicorn-access-log",
        "--disable-log-stats",
    ] + (["--enforce-eager"] if args.eager else [])  # fmt: skip
    parsed = _parser("http_overhead").parse_args(argv)
    parsed.subparser = "serve"
    return prepare_args(parsed)


async def run(args: argparse.Namespace) -> dict:
    import httpx
    import uvicorn
    from vllm import SamplingParams
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.app import build_app

    port = _free_port()
    sargs = serve_args(args, port)
    async with build_async_engine_client(sargs) as engine_client:
        tasks = await engine_client.get_supported_tasks()
        app = build_app(sargs, tasks, engine_client.model_config)
        await init_app_state(engine_client, app.state, sargs, tasks)
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        )
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        try:
            return await measure(args, app.state.stateful.engine, f"http://127.0.0.1:{port}",
                                 SamplingParams, httpx)  # fmt: skip
        finally:
            server.should_exit = True
            await serving


async def measure(args, engine, base: str, SamplingParams, httpx) -> dict:
    from vllm_stateful.client import connection_limits

    tok = engine.tokenizer
    lines = tick_text(tok, args.context)
    session = await engine.create_session(HEADER)
    for i in range(0, len(lines), 50):  # a few appends, like a live feed
        await engine.append(session.id, "".join(lines[i : i + 50]))
    await engine.wait_ingested(session.id)
    numbers = itertools.count(1000)  # four digits: questions of about one length

    def question() -> list[int]:
        return tok.encode(QUESTION.format(n=next(numbers)), add_special_tokens=False)

    def body() -> dict:
        return {
            "prompt": question(),
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }

    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    headers = {"X-Session-Token": session.access_token}
    lib, lib_stream = Series("library query"), Series("library query_stream")
    http, http_stream = Series("http session"), Series("http session, stream")
    stateless = Series("http stateless question")
    context = len(session.tokens)

    async with httpx.AsyncClient(base_url=base, timeout=300, limits=connection_limits()) as client:

        async def library() -> None:
            t0 = time.perf_counter()
            r = await engine.query(session.id, question(), params)
            lib.e2e_s.append(time.perf_counter() - t0)
            lib.computed.append(r.computed_tokens)

        async def library_stream() -> None:
            t0, first = time.perf_counter(), None
            async for _ in engine.query_stream(session.id, question(), params):
                first = first or time.perf_counter()
            lib_stream.ttft_s.append(first - t0)
            lib_stream.e2e_s.append(time.perf_counter() - t0)

        async def over_http() -> None:
            t0 = time.perf_counter()
            r = await client.post(
                f"/v1/sessions/{session.id}/completions", json=body(), headers=headers
            )
            http.e2e_s.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            http.computed.append(r.json()["session"]["computed_tokens"])

        async def over_http_stream() -> None:
            t0, first = time.perf_counter(), None
            async with client.stream("POST", f"/v1/sessions/{session.id}/completions",
                                     json={**body(), "stream": True}, headers=headers) as r:  # fmt: skip
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        first = first or time.perf_counter()
            http_stream.ttft_s.append(first - t0)
            http_stream.e2e_s.append(time.perf_counter() - t0)

        async def question_alone() -> None:
            t0 = time.perf_counter()
            r = await client.post("/v1/completions", json={**body(), "model": args.model_path})
            stateless.e2e_s.append(time.perf_counter() - t0)
            assert r.status_code == 200, r.text
            stateless.computed.append(r.json()["usage"]["prompt_tokens"])

        rounds = [library, over_http, library_stream, over_http_stream, question_alone]
        for _ in range(args.warmup):
            for step in rounds:
                await step()
        for s in (lib, lib_stream, http, http_stream, stateless):
            s.e2e_s.clear(), s.ttft_s.clear(), s.computed.clear()
        for rep in range(args.reps):
            # Rotate the order so no path always runs right after another.
            for step in rounds[rep % len(rounds) :] + rounds[: rep % len(rounds)]:
                await step()

    await engine.close_session(session.id)
    series = [lib, http, lib_stream, http_stream, stateless]
    out = {
        "context_tokens": context,
        "question_tokens": len(question()),
        "series": [s.summary() for s in series],
    }
    lp, hp = lib.summary()["e2e_p50_ms"], http.summary()["e2e_p50_ms"]
    out["http_overhead_p50_ms"] = round(hp - lp, 2)
    return out


def table(result: dict) -> str:
    rows = [
        "| path | e2e p50 (ms) | e2e p90 (ms) | TTFT p50 (ms) | prompt tokens computed |",
        "|---|---|---|---|---|",
    ]
    for s in result["series"]:
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        comp = "-" if s["computed_tokens_p50"] is None else f"{s['computed_tokens_p50']:.0f}"
        rows.append(
            f"| {s['name']} | {fmt(s['e2e_p50_ms'])} | {fmt(s['e2e_p90_ms'])} | {fmt(s['ttft_p50_ms'])} | {comp} |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="tiny", help="'tiny', 'smollm2' or a model folder")
    ap.add_argument("--dtype", default=None, help="default: float32 for tiny, bfloat16 otherwise")
    ap.add_argument("--context", type=int, default=1000, help="session context in tokens")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument(
        "--compile", dest="eager", action="store_false", help="use torch.compile (slow start)"
    )
    ap.add_argument(
        "--out",
        default=None,
        help="JSON path (default: benchmarks/results/http_overhead-<time>.json)",
    )
    args = ap.parse_args()

    from vllm_stateful.cli import enable_plugin

    enable_plugin(os.environ)  # before vLLM is imported, as the CLI does
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()

    from vllm_stateful import models

    args.model_path = {"smollm2": models.prepare_smollm2, "tiny": models.tiny_model}.get(
        args.model, lambda: args.model
    )()
    args.dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")

    result = asyncio.run(run(args))

    import vllm

    result.update(
        model=args.model, dtype=args.dtype, eager=args.eager, reps=args.reps,
        max_tokens=args.max_tokens, vllm=vllm.__version__, cores=os.cpu_count(),
        machine=platform.processor() or platform.machine(),
        command=f"python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}".strip(),
    )  # fmt: skip
    print(
        f"Model {args.model} ({args.dtype}, {'eager' if args.eager else 'compiled'}), "
        f"context {result['context_tokens']} tokens, question {result['question_tokens']} tokens, "
        f"{args.max_tokens} greedy tokens, {args.reps} reps, vLLM {vllm.__version__} CPU, {os.cpu_count()} cores\n"
    )
    print(table(result))
    print(
        f"\nHTTP overhead over the library call (e2e p50): {result['http_overhead_p50_ms']:.1f} ms"
    )
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"http_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")


if __name__ == "__main__":
    main()
