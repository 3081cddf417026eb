"""Ingestion throughput with no questions: this tree vs an earlier release.

A feed burst into one session: ``--tokens`` of real tick lines appended back
to back (one append per line, none waiting), timed from the first append to
the ingestion of the last, at a context of ``--context`` tokens; ``--reps``
bursts, the median reported. The same script runs once on this tree and once
on a git worktree of ``--revision`` (each in its own process and engine, one
after the other), so the ratio compares the two releases on one machine in
one run.

    python benchmarks/ingest_throughput.py --revision 92cf204
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

RESULTS = Path(__file__).parent / "results"
HEADER = "E-mini S&P 500 futures trades (time price size):\n"


async def child(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from marketbench.feed import LineTokens, lines
    from transformers import AutoTokenizer

    from vllm_stateful import StatefulEngine, models, stateful_engine_args

    path = {"smollm2": models.prepare_smollm2, "tiny": models.tiny_model}.get(args.model, lambda: args.model)()
    tok = AutoTokenizer.from_pretrained(path)
    feed = LineTokens(tok, lines())
    engine = StatefulEngine.from_engine_args(stateful_engine_args(
        model=path, dtype="float32", max_model_len=8192, enforce_eager=args.eager,
    ))  # fmt: skip
    rates = []
    for _ in range(args.reps + 1):  # the first burst warms up
        s = await engine.create_session(tok.encode(HEADER) + feed.take(args.context))
        burst = []
        while sum(map(len, burst)) < args.tokens:
            burst.append(feed.next_line()[1])
        start = time.perf_counter()
        for line in burst:
            await engine.append(s.id, line)
        await engine.wait_ingested(s.id)
        rates.append(sum(map(len, burst)) / (time.perf_counter() - start))
        await engine.close_session(s.id)
    engine.shutdown()
    print(json.dumps({"rates_tps": rates[1:]}))


def run(tree: Path, args: argparse.Namespace) -> list[float]:
    cmd = [sys.executable, str(tree / "benchmarks" / Path(__file__).name), "--child",
           "--model", args.model, "--context", str(args.context), "--tokens", str(args.tokens),
           "--reps", str(args.reps)] + (["--eager"] if args.eager else [])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{tree}: exit {out.returncode}\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["rates_tps"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--revision", default="92cf204", help="the earlier release (a git revision)")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--context", type=int, default=2000)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--eager", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        asyncio.run(child(args))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from marketbench.machine import machine

    with tempfile.TemporaryDirectory(prefix="vllm-stateful-rev-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.revision],
                       check=True, capture_output=True)  # fmt: skip
        # The older tree's benchmarks may lack this script: run this one
        # against the older package.
        (old / "benchmarks").mkdir(exist_ok=True)
        (old / "benchmarks" / Path(__file__).name).write_text(Path(__file__).read_text())
        try:
            before = run(old, args)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    now = run(ROOT, args)
    a, b = statistics.median(before), statistics.median(now)
    md = (
        f"{machine()}; {args.model} float32 ({'eager' if args.eager else 'compiled'}); a burst of "
        f"{args.tokens} tokens of tick lines appended back to back at {args.context} tokens of context, "
        f"no questions; median of {args.reps} bursts.\n\n"
        f"| release | ingestion (tokens/s) |\n|---|---|\n"
        f"| {args.revision} | {a:.0f} |\n| this tree | {b:.0f} |\n| ratio | {b / a:.2f}x |\n"
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest_throughput.json").write_text(json.dumps(
        {"args": vars(args), "machine": machine(), "before_tps": before, "now_tps": now}, indent=1))  # fmt: skip
    (RESULTS / "ingest_throughput.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
