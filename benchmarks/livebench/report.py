"""Summaries of a level, the results table and the latency-over-time plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable

from livebench.run import LevelRecord, idle_at


def pct(values: Iterable[float | None], p: float) -> float | None:
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def ms(x: float | None) -> str:
    if x is None:
        return "-"
    v = x * 1e3
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(rec: LevelRecord, idle: list[dict[str, Any]], flash_qid: str | None,
              engine: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The numbers of one level (one row of the table); ``engine``: its
    engine time from the step trace (``steps.engine_time``), if traced."""
    et = engine or {}
    ok = [q for q in rec.asked if q["error"] is None]
    # Flash asks that hit are cache reads: reported on their own, so that
    # "question latency" is the latency of answers the engine computed.
    plain = [q for q in ok if not q.get("flash")]
    e2e = [q["e2e_s"] for q in plain]
    idle_same = [idle_at(idle, q["qid"], q["context"] or q["acked_context"]) for q in plain]
    half = rec.duration_s / 2
    lag1 = [x["lag_s"] for x in rec.lags if x["t_ack"] < half]
    lag2 = [x["lag_s"] for x in rec.lags if x["t_ack"] >= half]
    server_lag = [x["server_lag_s"] for x in rec.lags]
    quarters: list[list[float]] = [[], [], [], []]
    for x in rec.lags:
        quarters[min(int(4 * x["t_ack"] / rec.duration_s), 3)].append(x["lag_s"])
    flash_asks = [q for q in ok if flash_qid is not None and q["qid"] == flash_qid]
    hits = [q for q in flash_asks if q.get("flash")]
    delays = [a["t_ack"] - a["t_sched"] for a in rec.acks]
    acked_tokens = sum(a["tokens"] for a in rec.acks)
    verified = rec.verification
    client_backlog = [b["client_tokens"] for b in rec.backlog]
    server_backlog = [b["server_tokens"] for b in rec.backlog if b["server_tokens"] is not None]
    p50, p99 = pct(e2e, 50), pct(e2e, 99)
    i50, i99 = pct(idle_same, 50), pct(idle_same, 99)
    return {
        "questions": len(rec.asked),
        "answered": len(ok),
        "errors": len(rec.asked) - len(ok),
        "computed_answers": len(plain),
        "p50_s": p50,
        "p99_s": p99,
        "idle_p50_s": i50,
        "idle_p99_s": i99,
        "p50_vs_idle": ratio(p50, i50),
        "p99_vs_idle": ratio(p99, i99),
        "context_min": min((q["context"] or q["acked_context"] for q in ok), default=None),
        "context_max": max((q["context"] or q["acked_context"] for q in ok), default=None),
        "answer_versions_behind_p50": pct(
            [q["acked_version"] - q["version"] for q in plain if q.get("version") is not None], 50
        ),
        "lag_first_half_p50_s": pct(lag1, 50),
        "lag_first_half_p99_s": pct(lag1, 99),
        "lag_second_half_p50_s": pct(lag2, 50),
        "lag_second_half_p99_s": pct(lag2, 99),
        # Rising, or rising and falling with the streams' rotations.
        "lag_p50_by_quarter_s": [pct(lags, 50) for lags in quarters],
        "server_lag_p50_s": pct(server_lag, 50),
        "appends_not_ingested": sum(1 for x in rec.lags if x["lag_s"] is None),
        "flash_asks": len(flash_asks),
        "flash_hits": len(hits),
        "flash_hit_rate": (len(hits) / len(flash_asks)) if flash_asks else None,
        "flash_hit_p50_s": pct([q["e2e_s"] for q in hits], 50),
        "staleness_p50_ms": pct([q.get("staleness_ms") for q in hits], 50),
        "staleness_p99_ms": pct([q.get("staleness_ms") for q in hits], 99),
        "appends_acknowledged": len(rec.acks),
        "tokens_acknowledged": acked_tokens,
        "acknowledged_tps": acked_tokens / rec.duration_s if rec.duration_s else None,
        "unsent_tokens": rec.unsent_tokens,
        "http_429": sum(a["retries"] for a in rec.acks),
        "retry_wait_s": sum(a["retry_wait_s"] for a in rec.acks),
        "feeder_delay_p50_s": pct(delays, 50),
        "feeder_delay_p99_s": pct(delays, 99),
        "backlog_max_tokens": max(client_backlog, default=None),
        "backlog_max_server_tokens": max(server_backlog, default=None),
        "backlog_max_session_tokens": max(
            (b["server_max_session_tokens"] if b.get("server_max_session_tokens") is not None
             else b.get("client_max_session_tokens", 0) for b in rec.backlog), default=None),  # fmt: skip
        "drain_s": rec.drain_s,
        "rotations": rec.rotations,
        "sessions_verified": len(verified),
        "all_appends_in_session": (all(v["ok"] for v in verified) if verified else None),
        "engine_busy_share": et.get("busy_share"),
        "in_flight_wait_p50_s": et.get("in_flight_wait_p50_s"),
        "in_flight_wait_mean_s": et.get("in_flight_wait_mean_s"),
        "own_p50_s": et.get("own_p50_s"),
        "own_p50_vs_idle": ratio(et.get("own_p50_s"), i50),
    }


def _num(x: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


COLUMNS = (
    "engine", "sessions", "load", "offered tok/s", "acknowledged tok/s", "answered", "p50 ms", "p99 ms",
    "idle p50 ms", "idle p99 ms", "p50 / idle", "p99 / idle",
    "lag p50/p99 ms, 1st half", "lag p50/p99 ms, 2nd half", "flash hits",
    "staleness p50/p99 ms", "429s (wait s)", "backlog max: all (one session), tokens", "acknowledged = in session",
)  # fmt: skip


def row(level: dict[str, Any]) -> list[str]:
    s = level["summary"]
    stock = level["engine"] != "vllm-stateful"
    verified = s["all_appends_in_session"]
    runs = level.get("repeats", 1)
    return [
        level["engine"] + (f" (run {level['repeat'] + 1}/{runs})" if runs > 1 else ""),
        str(level["sessions"]),
        f"{level['load']:.0%}",
        f"{level['offered_tps']:.0f}",
        "n/a" if stock else _num(s["acknowledged_tps"], "{:.0f}"),
        f"{s['answered']}/{s['questions']}",
        ms(s["p50_s"]),
        ms(s["p99_s"]),
        ms(s["idle_p50_s"]),
        ms(s["idle_p99_s"]),
        _num(s["p50_vs_idle"], "{:.2f}x"),
        _num(s["p99_vs_idle"], "{:.2f}x"),
        "n/a" if stock else f"{ms(s['lag_first_half_p50_s'])} / {ms(s['lag_first_half_p99_s'])}",
        "n/a" if stock else f"{ms(s['lag_second_half_p50_s'])} / {ms(s['lag_second_half_p99_s'])}",
        "n/a" if stock else f"{s['flash_hits']}/{s['flash_asks']}",
        "n/a" if stock else f"{_num(s['staleness_p50_ms'], '{:.0f}')} / {_num(s['staleness_p99_ms'], '{:.0f}')}",
        "n/a" if stock else f"{s['http_429']} ({s['retry_wait_s']:.1f})",
        "n/a" if stock else f"{s['backlog_max_tokens']} ({s['backlog_max_session_tokens']})",
        "n/a" if stock else ("-" if verified is None else
                             f"{'yes' if verified else 'NO'} ({s['sessions_verified']} sessions)"),
    ]  # fmt: skip


def table(levels: list[dict[str, Any]]) -> str:
    out = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    out += ["| " + " | ".join(row(lv)) + " |" for lv in levels]
    return "\n".join(out)


MEDIAN_COLUMNS = (
    "engine", "sessions", "load", "runs", "p50 / idle: median (each run)",
    "p99 / idle: median (each run)", "lag p50, 2nd / 1st half: median (each run, ms)",
    "flash hits, all runs",
)  # fmt: skip


def medians(levels: list[dict[str, Any]]) -> str:
    """One row per level run more than once: the median of each figure over
    the runs, and every run's value (a single run of ~50 computed answers
    moves by ~10% from run to run)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for lv in levels:
        if lv.get("summary") is not None and lv.get("repeats", 1) > 1:
            groups.setdefault((lv["engine"], lv["sessions"], lv["load"]), []).append(lv["summary"])
    if not groups:
        return ""

    def each(ss: list[dict[str, Any]], key: str, fmt) -> str:
        xs = [s[key] for s in ss]
        return f"{fmt(pct(xs, 50))} ({', '.join(fmt(x) for x in xs)})"

    def times(x: float | None) -> str:
        return _num(x, "{:.2f}x")

    def lag(s: dict[str, Any]) -> str:
        return f"{ms(s['lag_first_half_p50_s'])} -> {ms(s['lag_second_half_p50_s'])}"

    out = ["| " + " | ".join(MEDIAN_COLUMNS) + " |", "|" + "---|" * len(MEDIAN_COLUMNS)]
    for (engine, n, load), ss in groups.items():
        stock = engine != "vllm-stateful"
        growth = [ratio(s["lag_second_half_p50_s"], s["lag_first_half_p50_s"]) for s in ss]
        hits = f"{sum(s['flash_hits'] for s in ss)}/{sum(s['flash_asks'] for s in ss)}"
        out.append("| " + " | ".join([
            engine, str(n), f"{load:.0%}", str(len(ss)),
            each(ss, "p50_vs_idle", times), each(ss, "p99_vs_idle", times),
            "n/a" if stock else f"2nd/1st {times(pct(growth, 50))} ({'; '.join(map(lag, ss))})",
            "n/a" if stock else hits,
        ]) + " |")  # fmt: skip
    return "\n".join(out)


def engine_table(levels: list[dict[str, Any]]) -> str:
    rows = [lv for lv in levels if lv.get("engine_time") and lv.get("summary")]
    if not rows:
        return ""
    out = [
        "| sessions | load | run | busy | busy by kind of step | in-flight wait p50 / mean ms "
        "| waited behind: questions x mean wait ms (step p50 ms) | p50 / idle "
        "| own steps p50 / idle |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in rows:
        et, s = lv["engine_time"], lv["summary"]
        kinds = ", ".join(f"{k} {v:.0%}" for k, v in et["busy_share_by_kind"].items())
        behind = ", ".join(
            f"{k} {n} x {ms(w)} ({ms(et['step_p50_s_by_kind'].get(k))})"
            for k, (n, w) in et["waited_behind"].items())  # fmt: skip
        out.append(
            f"| {lv['sessions']} | {lv['load']:.0%} | {lv.get('repeat', 0) + 1} "
            f"| {_num(et['busy_share'], '{:.0%}')} | {kinds or '-'} "
            f"| {ms(et['in_flight_wait_p50_s'])} / {ms(et['in_flight_wait_mean_s'])} "
            f"| {behind or '-'} "
            f"| {_num(s['p50_vs_idle'], '{:.2f}x')} | {_num(s['own_p50_vs_idle'], '{:.2f}x')} |"
        )
    return "\n".join(out)


def markdown(res: dict[str, Any]) -> str:
    m = res["meta"]
    cap = res.get("capacity") or {}
    lines = [
        "## Live streams: questions while ticks stream in (`live_stream.py`)",
        "",
        f"Command: `{m['command']}`  ",
        f"Machine: {m['machine']}; CPU flags: {m['cpu_flags']}  ",
        f"Software: vLLM {m['vllm']}, torch {m['torch']}, Python {m['python']}  ",
        f"Model: {m['model']}, dtype {m['dtype']}, KV cache {m.get('kv_cache_dtype', 'auto')}  ",
        f"Data: {m['data']}  ",
        f"Run: {m['started']}, {m.get('wall_s', 0) / 60:.1f} min; {m['parameters']}",
        "",
        f"Ingestion capacity (no questions, context ~{cap.get('context')} tokens): "
        f"**{_num(cap.get('tps'), '{:.0f}')} tokens/s** ({cap.get('method', '-')}). "
        f"Flash evaluation time (idle, same question): {_num(res.get('evaluation_ms'), '{:.0f}')} ms, "
        "used as `max_staleness_ms`.",
        "",
    ]
    by = res.get("capacity_by_sessions") or {}
    if by:
        lines += ["Each level's load is a share of the capacity measured with its own number "
                  "of streams fed at once: " + ", ".join(
                      f"{n} stream(s) {_num(c.get('tps'), '{:.0f}')} tokens/s"
                      for n, c in by.items()) + ".", ""]  # fmt: skip
    lines += [
        "Latencies are end to end on the client, waiting included. \"p50/p99\" cover answers "
        "the engine computed (flash hits are counted under \"flash hits\"); \"idle\" is the same "
        "question at the same context on an idle engine (feed paused, data ingested; stock vLLM: "
        "the context already in its prefix cache; measured again before each run of the "
        "levels). Lag: append acknowledged to the `ingested` event covering it. Stock vLLM "
        "has no ingestion: its questions carry the whole context.",
        "",
        "Load counts all the ingestion a stream makes: when a stream reaches its rotation point "
        "it moves to a fresh session that ingests its newest ticks again (the start context), "
        "so the feed (\"offered tok/s\", appended) is the load's share left after those "
        "windows; the streams start at contexts spread evenly up to the rotation point, so "
        "they rotate one after another and the cost of a token stays the same over the run.",
        "",
        table(res["levels"]),
    ]
    engine = engine_table(res["levels"])
    if engine:
        lines += ["", "Where a question's time goes (vllm-stateful's step trace, over each "
                  "level's feed): the engine's busy share, by kind of step; the step in flight "
                  "when a computed question was sent, which it waits for (p50 and mean, 0 when "
                  "the engine was idle); and what is left, its own steps, against idle.", "",
                  engine]  # fmt: skip
    summary = medians(res["levels"])
    if summary:
        lines += ["", "Medians over the runs of each level:", "", summary]
    if res.get("notes"):
        lines += ["", "Notes:"] + [f"- {n}" for n in res["notes"]]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sessions = sorted({lv["sessions"] for lv in res["levels"]})
    fig, axes = plt.subplots(len(sessions), 1, figsize=(10, 3.2 * len(sessions)), squeeze=False)
    colors = {}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, n in zip(axes[:, 0], sessions):
        for lv in (x for x in res["levels"] if x["sessions"] == n):
            key = (lv["engine"], lv["load"], lv.get("repeat", 0))
            c = colors.setdefault(key, palette[len(colors) % len(palette)])
            qs = [q for q in lv["asked"] if q["e2e_s"] is not None]
            comp = [q for q in qs if not q.get("flash")]
            hits = [q for q in qs if q.get("flash")]
            ls = "-" if lv["engine"] == "vllm-stateful" else ":"
            name = f"{lv['engine']} {lv['load']:.0%}" + (
                f" run {lv['repeat'] + 1}" if lv.get("repeats", 1) > 1 else "")
            ax.plot([q["t_start"] for q in comp], [q["e2e_s"] for q in comp], ls, marker="o",
                    ms=3, lw=0.8, color=c, label=name)  # fmt: skip
            if hits:
                ax.plot([q["t_start"] for q in hits], [q["e2e_s"] for q in hits], "x", ms=4,
                        color=c, label=f"{name} flash hits")  # fmt: skip
        ax.set_yscale("log")
        ax.set_title(f"{n} session{'s' if n > 1 else ''}")
        ax.set_ylabel("question latency (s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=3)
    axes[-1, 0].set_xlabel("time since the feed started (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
