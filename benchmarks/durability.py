"""What durability and offload cost, and what they save: one run.

Real market ticks on one engine (SmolLM2 by default), through the engine API:

* append acknowledgement latency with the session store off, with group
  commit (the default) and with one fsync per append, for one session
  appending alone and 16 appending at once, on a quiet engine and while
  the appends are being ingested;
* bringing back an offloaded session (its KV loaded back into the pool)
  vs recomputing it, at 2k and 7k tokens, and the first question after;
* restore after a restart vs context size: KV rebuilt by recomputing vs
  loaded from the offload files a previous run left on disk.

Several session APIs (``StatefulEngine``) share the one vLLM engine, each
with its own store, so every figure comes from the same engine in one run.
A restart is simulated faithfully: the restored session gets a fresh cache
key, so nothing of the previous run's KV is found in vLLM's prefix cache.

    python benchmarks/durability.py            # SmolLM2, compiled
    python benchmarks/durability.py --smoke    # tiny model, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

from marketbench.feed import LineTokens, lines  # benchmarks/ is on sys.path when run as a script
from marketbench.machine import machine
from marketbench.results import percentile

RESULTS = Path(__file__).parent / "results"
HEADER = "E-mini S&P 500 futures trades (time price size):\n"
QUESTION = "\nQuestion: what was the last traded price?\nAnswer:"


def ms(values: list[float], p: float) -> float:
    return round(percentile(values, p) * 1e3, 2)


class Bench:
    def __init__(self, engine, tokenizer, work: Path):
        self.engine = engine  # the shared StatefulEngine (store off)
        self.feed = LineTokens(tokenizer, lines())
        self.header = tokenizer.encode(HEADER)
        self.question = tokenizer.encode(QUESTION, add_special_tokens=False)
        self.work = work

    def facade(self, store: str, sync: str = "group"):
        from vllm_stateful import StatefulConfig, StatefulEngine

        return StatefulEngine(
            self.engine.engine,
            StatefulConfig(store=store, store_sync=sync, offload_idle_s=None),
        )

    async def drop(self, eng) -> None:
        for sid in list(eng.sessions):
            await eng.close_session(sid)
        if eng.journal.store is not None:
            eng.journal.store.close()
        eng.registry.stop()
        eng.flash.scheduler.stop()

    # ------------------------------------------------------------ appends

    async def appends(self, mode: str, sessions: int, rounds: int, quiet: bool) -> list[float]:
        """Latency of ``append`` (call to acknowledgement) for ``sessions``
        appending one tick line each at once, ``rounds`` times; ``quiet``
        waits for ingestion between rounds."""
        store = "off" if mode == "off" else str(self.work / f"{mode}-{uuid.uuid4().hex[:6]}.sqlite3")
        eng = self.facade(store, "group" if mode == "off" else mode)
        ids = [(await eng.create_session(self.header + self.feed.take(200))).id for _ in range(sessions)]
        out: list[float] = []

        async def one(sid: str) -> None:
            line = self.feed.next_line()[1]
            start = time.perf_counter()
            await eng.append(sid, line)
            out.append(time.perf_counter() - start)

        for r in range(rounds):
            await asyncio.gather(*(one(sid) for sid in ids))
            if quiet or r % 8 == 7:  # streaming: let the backlog drain now and then
                for sid in ids:
                    await eng.wait_ingested(sid)
        await self.drop(eng)
        return out

    # ------------------------------------------------------------ offload

    async def offload(self, context: int, reps: int) -> dict:
        eng = self.facade("off")
        rec, back, out_s, first_q, resident_q = [], [], [], [], []
        for _ in range(reps):
            tokens = self.header + self.feed.take(context - len(self.header))
            start = time.perf_counter()
            s = await eng.create_session(tokens)  # ingests (computes) all of it
            rec.append(time.perf_counter() - start)
            resident_q.append(await self.ask(eng, s.id))
            start = time.perf_counter()
            assert await eng.residency.offload(s)
            out_s.append(time.perf_counter() - start)
            await written(s.key)
            start = time.perf_counter()
            await eng.residency.bring_back(s)
            back.append(time.perf_counter() - start)
            assert s.restore_computed_tokens == 1, s.restore_computed_tokens
            first_q.append(await self.ask(eng, s.id))
            await eng.close_session(s.id)
        await self.drop(eng)
        return {
            "context": len(tokens), "recompute_s": rec, "offload_s": out_s, "bring_back_s": back,
            "question_after_s": first_q, "question_resident_s": resident_q,
        }  # fmt: skip

    async def ask(self, eng, sid: str) -> float:
        from vllm import SamplingParams

        start = time.perf_counter()
        await eng.query(sid, self.question, SamplingParams(temperature=0, max_tokens=8))
        return time.perf_counter() - start

    # ------------------------------------------------------------ restart

    async def restart(self, context: int, from_disk: bool) -> float:
        """Seconds from ``restore()`` until the session is active again."""
        path = str(self.work / f"restart-{uuid.uuid4().hex[:6]}.sqlite3")
        before = self.facade(path)
        s = await before.create_session(self.header + self.feed.take(context - len(self.header)))
        # A fresh pool knows nothing of this session: new cache key (the
        # offload files follow it, as a restarted engine would find them).
        key = uuid.uuid4().hex
        if from_disk:
            from vllm_stateful.kv.offload import offload_dir

            assert await before.residency.offload(s)
            await written(s.key)
            for old in offload_dir().glob(f"{s.key}.*"):
                old.rename(old.with_name(key + old.suffix))
        before.journal.store.close()
        before.journal.store = None  # the "crash": nothing more reaches the store
        await self.drop(before)  # frees the pool, like the dead process did
        with sqlite3.connect(path) as db:
            db.execute("UPDATE sessions SET key = ?", (key,))
        after = self.facade(path)
        start = time.perf_counter()
        plan = await after.restore()
        [restored] = plan.restoring
        await after.wait_ingested(restored.id, restored.ready_version)
        elapsed = time.perf_counter() - start
        computed = restored.ingest_computed_tokens
        assert (computed < len(restored.tokens) / 10) if from_disk else computed == len(restored.tokens), computed
        await self.drop(after)
        return elapsed


async def written(key: str) -> None:
    """Until the offloaded copy is on disk (it is in host memory at once)."""
    from vllm_stateful.kv.offload import stored_tokens

    while stored_tokens(key) is None:
        await asyncio.sleep(0.01)


def table(res: dict) -> str:
    rows = ["### Append acknowledgement (ms)", "",
            "| store | sessions appending at once | engine | p50 | p99 | appends |",
            "|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["appends"]:
        rows.append(f"| {r['mode']} | {r['sessions']} | {r['engine']} | {r['p50_ms']} | {r['p99_ms']} | {r['n']} |")
    rows += ["", "### Offloaded session: bring back vs recompute (medians)", "",
             "| context (tokens) | recompute (ms) | offload (ms) | bring back (ms) | speed-up | "
             "question after bring-back (ms) | question, resident (ms) |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in res["offload"]:
        rec, back = statistics.median(r["recompute_s"]), statistics.median(r["bring_back_s"])
        rows.append(
            f"| {r['context']} | {rec * 1e3:.0f} | {statistics.median(r['offload_s']) * 1e3:.0f} | "
            f"{back * 1e3:.0f} | {rec / back:.1f}x | {statistics.median(r['question_after_s']) * 1e3:.0f} | "
            f"{statistics.median(r['question_resident_s']) * 1e3:.0f} |"
        )
    rows += ["", "### Restore after a restart (ms, median)", "",
             "| context (tokens) | recomputed | loaded from disk | speed-up |", "|---|---|---|---|"]  # fmt: skip
    for r in res["restart"]:
        rec, disk = statistics.median(r["recompute_s"]), statistics.median(r["disk_s"])
        rows.append(f"| {r['context']} | {rec * 1e3:.0f} | {disk * 1e3:.0f} | {rec / disk:.1f}x |")
    return "\n".join(rows)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or a model folder")
    ap.add_argument("--eager", action="store_true", help="skip torch.compile (faster start)")
    ap.add_argument("--rounds", type=int, default=40, help="append rounds per setting")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--offload-contexts", default="2000,7000")
    ap.add_argument("--restart-contexts", default="1000,2000,4000,7000")
    ap.add_argument("--smoke", action="store_true", help="tiny model, few rounds (a check, not a result)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.smoke:
        args.model, args.eager, args.rounds, args.reps = "tiny", True, 4, 1
        args.offload_contexts, args.restart_contexts = "300", "300"
    out = Path(args.out or RESULTS / ("smoke/durability" if args.smoke else "durability"))

    from transformers import AutoTokenizer

    from vllm_stateful import StatefulConfig, StatefulEngine, models, stateful_engine_args

    path = {"smollm2": models.prepare_smollm2, "tiny": models.tiny_model}.get(args.model, lambda: args.model)()
    offload_root = tempfile.mkdtemp(prefix="vllm-stateful-offload-")
    os.environ["VLLM_STATEFUL_OFFLOAD_DIR"] = offload_root  # engine processes inherit it
    engine = StatefulEngine.from_engine_args(
        stateful_engine_args(model=path, max_model_len=8192, enforce_eager=args.eager),
        StatefulConfig(store="off", offload_idle_s=None),
    )
    bench = Bench(engine, AutoTokenizer.from_pretrained(path), Path(tempfile.mkdtemp(prefix="vllm-stateful-store-")))
    res: dict = {"appends": [], "offload": [], "restart": []}
    for quiet in (True, False):
        for sessions in (1, 16):
            for mode in ("off", "group", "each"):
                lat = await bench.appends(mode, sessions, args.rounds, quiet)
                row = {"mode": mode, "sessions": sessions, "engine": "quiet" if quiet else "ingesting",
                       "p50_ms": ms(lat, 50), "p99_ms": ms(lat, 99), "n": len(lat)}  # fmt: skip
                res["appends"].append(row)
                print(row, file=sys.stderr, flush=True)
    for ctx in map(int, args.offload_contexts.split(",")):
        res["offload"].append(await bench.offload(ctx, args.reps))
        print(res["offload"][-1], file=sys.stderr, flush=True)
    for ctx in map(int, args.restart_contexts.split(",")):
        row = {"context": ctx, "recompute_s": [], "disk_s": []}
        for _ in range(args.reps):
            row["recompute_s"].append(await bench.restart(ctx, from_disk=False))
            row["disk_s"].append(await bench.restart(ctx, from_disk=True))
        res["restart"].append(row)
        print(row, file=sys.stderr, flush=True)
    engine.shutdown()

    md = "\n".join([
        f"{machine()}; model {args.model} ({'eager' if args.eager else 'compiled'}); one run, "
        f"{args.reps} reps per size, {args.rounds} append rounds per setting. Store: SQLite WAL on the "
        f"local disk; offload copies under {'a temporary directory'} (host memory, then disk).",
        "", table(res), "",
        f"Command: `python benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`".rstrip(" `") + "`",
    ])  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "machine": machine(), **res}, indent=1))
    out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    asyncio.run(main())
