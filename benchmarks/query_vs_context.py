"""Query latency as the context grows: a session vs stock vLLM, one run.

Three engines run the same token ids on the same model, one after another
(never two at once, so they do not share the CPU):

* ``session``: vllm-stateful. New ticks are appended and ingested off the
  query path; the timed query sends only the question.
* ``stock, prefix cache off``: every query sends context + question.
* ``stock, prefix cache on`` (vLLM's default): the same full prompts; between
  two queries new ticks arrive, so each query recomputes them plus the
  question on top of what the cache kept.

At each context size, one untimed query warms up, then ``--reps`` rounds each
append ``--new-tokens`` of ticks and time one query (TTFT and end to end,
``--max-tokens`` greedy tokens). Medians are reported, and their ratios.

    python benchmarks/query_vs_context.py            # SmolLM2, compiled
    python benchmarks/query_vs_context.py --eager    # faster start
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
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

from marketbench.feed import LineTokens, lines  # benchmarks/ is on sys.path when run as a script

RESULTS = Path(__file__).parent / "results"
QUESTION = "\nQuestion: what was the last traded price?\nAnswer:"
HEADER = "E-mini S&P 500 futures trades (time price size):\n"


@dataclass
class Point:
    engine: str
    bucket: int  # nominal context size
    context: int = 0  # actual tokens before the last timed question
    ttft_s: list[float] = field(default_factory=list)
    e2e_s: list[float] = field(default_factory=list)
    computed: list[int] = field(default_factory=list)  # prompt tokens computed

    @property
    def ttft(self) -> float:
        return statistics.median(self.ttft_s)

    @property
    def e2e(self) -> float:
        return statistics.median(self.e2e_s)


def schedule(tokenizer, contexts: list[int], reps: int, new_tokens: int) -> list[tuple[int, list[list[int]]]]:
    """Per context bucket: the growth to reach it, then one delta per rep.
    Identical for every engine."""
    # Tick lines tokenized one by one, exactly as a session's appends are.
    feed = LineTokens(tokenizer, lines())
    plan, size = [], len(tokenizer.encode(HEADER))
    for target in contexts:
        deltas = [feed.take(max(target - size, 1))]
        size += len(deltas[0])
        for _ in range(reps):
            deltas.append(feed.take(new_tokens))
            size += len(deltas[-1])
        plan.append((target, deltas))
    return plan


async def timed(stream) -> tuple[float, float, object]:
    start = time.perf_counter()
    first = last = None
    async for item in stream:
        if first is None:
            first = time.perf_counter()
        last = item
    return first - start, time.perf_counter() - start, last


async def run_session(args, plan) -> list[Point]:
    from vllm import SamplingParams

    from vllm_stateful import StatefulEngine, stateful_engine_args

    engine = StatefulEngine.from_engine_args(stateful_engine_args(**engine_kwargs(args)))
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    question = engine.tokenizer.encode(QUESTION, add_special_tokens=False)
    session = await engine.create_session(HEADER)
    points = []
    try:
        for target, deltas in plan:
            await engine.append(session.id, deltas[0])
            await engine.wait_ingested(session.id)
            await engine.query(session.id, question, params)  # warm-up
            point = Point("session", target)
            for delta in deltas[1:]:
                await engine.append(session.id, delta)
                await engine.wait_ingested(session.id)  # off the query path
                ttft, e2e, last = await timed(engine.query_stream(session.id, question, params))
                point.ttft_s.append(ttft)
                point.e2e_s.append(e2e)
                point.computed.append(last.computed_tokens)
            point.context = len(session.tokens)
            points.append(point)
            progress(point)
    finally:
        engine.shutdown()
    return points


async def run_stock(args, plan, prefix_caching: bool) -> list[Point]:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(
        AsyncEngineArgs(**engine_kwargs(args), enable_prefix_caching=prefix_caching)
    )
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    params.output_kind = RequestOutputKind.DELTA
    question = tok.encode(QUESTION, add_special_tokens=False)
    context = tok.encode(HEADER)
    name = f"stock, prefix cache {'on' if prefix_caching else 'off'}"

    def ask():
        prompt = TokensPrompt(prompt_token_ids=context + question)
        return llm.generate(prompt, params.clone(), uuid.uuid4().hex)

    points = []
    try:
        for target, deltas in plan:
            context += deltas[0]
            await timed(ask())  # warm-up, as for the session
            point = Point(name, target)
            for delta in deltas[1:]:
                context += delta  # new data arrived since the last query
                ttft, e2e, last = await timed(ask())
                point.ttft_s.append(ttft)
                point.e2e_s.append(e2e)
                point.computed.append(len(context) + len(question) - (last.num_cached_tokens or 0))
            point.context = len(context)
            points.append(point)
            progress(point)
    finally:
        llm.shutdown()
    return points


def engine_kwargs(args) -> dict:
    return dict(
        model=args.model_path,
        dtype=args.dtype,
        enforce_eager=args.eager,
        max_model_len=8192,
    )


def progress(p: Point) -> None:
    print(
        f"  {p.engine:<24} context {p.context:>5}  ttft p50 {p.ttft * 1e3:8.1f} ms  "
        f"e2e p50 {p.e2e * 1e3:8.1f} ms  computed {statistics.median(p.computed):.0f}",
        file=sys.stderr,
        flush=True,
    )


def table(points: list[Point], contexts: list[int]) -> str:
    by = {(p.engine, p.bucket): p for p in points}
    engines = list(dict.fromkeys(p.engine for p in points))
    rows = [
        "| context (tokens) | engine | TTFT p50 (ms) | end-to-end p50 (ms) | prompt tokens computed | e2e vs session |",
        "|---|---|---|---|---|---|",
    ]
    for c in contexts:
        base = by.get(("session", c))
        for name in engines:
            p = by.get((name, c))
            if p is None:
                continue
            ratio = f"{p.e2e / base.e2e:.2f}x" if base else "-"
            rows.append(
                f"| {p.context} | {name} | {p.ttft * 1e3:.0f} | {p.e2e * 1e3:.0f} | "
                f"{statistics.median(p.computed):.0f} | {ratio} |"
            )
    return "\n".join(rows)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model folder")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--contexts", default="500,1000,2000,4000,7000")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64, help="ticks arriving between queries")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--eager", action="store_true", help="skip torch.compile (faster start)")
    ap.add_argument("--out", default=str(RESULTS / "query_vs_context"))
    args = ap.parse_args()

    from vllm_stateful import models

    args.model_path = {"smollm2": models.prepare_smollm2, "tiny": models.tiny_model}.get(
        args.model, lambda: args.model
    )()
    contexts = [int(c) for c in args.contexts.split(",")]
    from transformers import AutoTokenizer

    plan = schedule(AutoTokenizer.from_pretrained(args.model_path), contexts, args.reps, args.new_tokens)

    points: list[Point] = []
    for label, run in (
        ("vllm-stateful session", lambda: run_session(args, plan)),
        ("stock vLLM, prefix caching off", lambda: run_stock(args, plan, False)),
        ("stock vLLM, prefix caching on", lambda: run_stock(args, plan, True)),
    ):
        print(f"[{label}]", file=sys.stderr, flush=True)
        points += await run()

    import vllm

    md = "\n".join(
        [
            f"Model {args.model} ({args.dtype}, {'eager' if args.eager else 'compiled'}), "
            f"vLLM {vllm.__version__} CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}); "
            f"{args.reps} reps per size, {args.new_tokens} new tokens between queries, "
            f"{args.max_tokens} greedy tokens per answer.",
            "",
            table(points, contexts),
            "",
            f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".replace("  ", " "),
        ]
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(
        json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("out", "model_path")}, "points": [asdict(p) for p in points]}, indent=1)
    )
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    asyncio.run(main())
