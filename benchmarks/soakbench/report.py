"""The soak's Markdown (header, verdicts, activity, samples) and its plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from livebench.report import ms


def _n(x: Any, fmt: str = "{:.0f}") -> str:
    return "-" if x is None else fmt.format(x)


SAMPLE_COLUMNS = (
    "t (s)", "phase", "RSS MB (API + engine)", "sessions (ending)", "pinned blocks / bound",
    "free blocks", "pinned tokens / session tokens", "event streams: server / client",
    "event queue max", "backlog tokens", "vLLM running / waiting", "sessions opened",
    "questions answered",
)  # fmt: skip


def sample_row(s: dict[str, Any]) -> list[str]:
    return [
        f"{s['t']:.0f}", s["phase"],
        f"{s['rss_mb']:.0f} ({s['api_rss_mb']:.0f} + {s['engine_rss_mb']:.0f})",
        f"{_n(s['sessions'])} ({_n(s['sessions_ending'])})",
        f"{_n(s['pinned_blocks'])} / {s['blocks_bound']}", _n(s["free_blocks"]),
        f"{_n(s['engine_pinned_tokens'])} / {s['tokens_bound']}",
        f"{_n(s['event_subscribers'])} / {s['client_streams']}", _n(s["event_queue_max"]),
        _n(s["backlog_tokens"]), f"{_n(s['requests_running'])} / {_n(s['requests_waiting'])}",
        str(s["opened"]), str(s["answered"]),
    ]  # fmt: skip


def thinned(samples: list[dict[str, Any]], rows: int) -> list[dict[str, Any]]:
    """Every baseline and end sample, and about ``rows`` run samples evenly spread."""
    run = [s for s in samples if s["phase"] == "run"]
    step = max(1, round(len(run) / rows))
    keep = {id(s) for s in run[::step]} | ({id(run[-1])} if run else set())
    return [s for s in samples if s["phase"] != "run" or id(s) in keep]


def markdown(res: dict[str, Any]) -> str:
    m, fig, act = res["meta"], res["figures"], res["activity"]
    s = act.get("summary") or {}
    lines = [
        "## Soak: streaming sessions that must not leak (`soak.py`)",
        "",
        f"Command: `{m['command']}`  ",
        f"CPU: {m['cpu']} ({m['cpu_flags']}); machine: {m['machine']}  ",
        f"Software: vllm-stateful {m['vllm_stateful']}, vLLM {m['vllm']}, torch {m['torch']}, "
        f"Python {m['python']}  ",
        f"Model: {m['model']}, dtype {m['dtype']}  ",
        f"Data: {m['data']}  ",
        f"Run: {m['started']}, {m.get('wall_s', 0) / 60:.1f} min in all; {m['parameters']}",
        "",
        "A leak check, not a speed figure: latencies below only show that the sessions were "
        "served throughout (the load is a fixed share of a capacity given or measured first).",
        "",
        "### Verdicts",
        "",
        "| criterion | measured | limit | verdict |",
        "|---|---|---|---|",
    ]
    lines += [f"| {v['name']} | {v['measured']} | {v['limit']} | **{v['verdict']}** |"
              for v in res["verdicts"]]  # fmt: skip
    lines += [
        "",
        f"Overall: **{'PASS' if res['passed'] else 'FAIL'}**. RSS of the server's process tree "
        f"(API process + engine core): {_n(fig.get('rss_baseline_mb'))} MB before the sessions, "
        f"{_n(fig.get('rss_start_mb'))} MB at the first sample of the run, "
        f"{_n(fig.get('rss_second_half_start_mb'))} MB at the start of the second half, "
        f"{_n(fig.get('rss_end_mb'))} MB at the last, {_n(fig.get('rss_end_after_close_mb'))} MB "
        "with every session closed.",
        "",
        "### Activity",
        "",
        f"- Feed: {act['offered_tps']:.0f} tokens/s offered over {m['sessions']} streams "
        f"({act['feed_load']:.0%} of the {act['capacity_tps']:.0f} tokens/s ingestion capacity, "
        f"{(res.get('capacity') or {}).get('method', 'measured')}; "
        f"{act['load']:.0%} with the prefixes of rotated sessions), "
        f"{_n(s.get('appends_acknowledged'))} appends, {_n(s.get('tokens_acknowledged'))} tokens "
        f"acknowledged, {_n(s.get('http_429'))} 429s, {_n(s.get('unsent_tokens'))} tokens unsent.",
        f"- Lifecycle: {act['sessions_opened']} sessions opened, {act['sessions_closed']} closed, "
        f"{act['rotations']} rotations (a stream moves to a fresh session before passing "
        f"{m['rotate_at']} tokens); {act['flash_registered']} flash queries registered.",
        f"- Questions: {_n(s.get('answered'))}/{_n(s.get('questions'))} answered, "
        f"{_n(s.get('flash_hits'))}/{_n(s.get('flash_asks'))} flash asks were hits; "
        f"computed answers p50 {ms(s.get('p50_s'))} ms, p99 {ms(s.get('p99_s'))} ms.",
        f"- Ingestion lag (append acknowledged to its `ingested` event): p99 "
        f"{ms(s.get('lag_first_half_p99_s'))} ms in the first half, "
        f"{ms(s.get('lag_second_half_p99_s'))} ms in the second.",
        f"- Samples every {m['interval_s']:g} s: {fig['samples_run']} during the run.",
    ]
    if act.get("errors"):
        lines.append(f"- Errors: {act['errors'][:5]}")
    if res.get("notes"):
        lines += [f"- Note: {n}" for n in res["notes"]]
    lines += ["", "### Samples", "",
              "Every baseline and end sample and about one run sample a minute (all of them "
              "are in the JSON).", "",
              "| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]  # fmt: skip
    rows = max(10, round(len(res["samples"]) * m["interval_s"] / 60))
    lines += ["| " + " | ".join(sample_row(x)) + " |" for x in thinned(res["samples"], rows)]
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ss = [s for s in res["samples"] if s["phase"] != "baseline"]
    t = [s["t"] / 60 for s in ss]
    run = [s for s in ss if s["phase"] == "run"]
    fig, axes = plt.subplots(3, 1, figsize=(10, 9), sharex=True)

    def series(key: str) -> list[float]:
        return [float("nan") if s[key] is None else s[key] for s in ss]

    ax = axes[0]
    ax.plot(t, series("rss_mb"), label="server process tree")
    ax.plot(t, series("engine_rss_mb"), label="engine core", lw=0.8)
    ax.plot(t, series("api_rss_mb"), label="API process", lw=0.8)
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"RSS slope, second half: {res['figures']['rss_mb_slope_per_min']:+.2f} MB/min"
                 if res["figures"].get("rss_mb_slope_per_min") is not None else "RSS")  # fmt: skip
    ax = axes[1]
    ax.plot(t, series("pinned_blocks"), label="pinned blocks")
    ax.plot(t, series("blocks_bound"), ":", label="blocks the sessions' tokens fill")
    ax.plot(t, series("free_blocks"), label="free blocks", lw=0.8)
    ax.set_ylabel("KV blocks")
    ax = axes[2]
    ax.plot(t, series("event_subscribers"), label="event subscribers")
    ax.plot(t, series("event_queue_max"), label="fullest event queue (events)")
    ax.plot(t, series("requests_waiting"), label="vLLM waiting requests", lw=0.8)
    ax.plot(t, series("sessions"), label="open sessions", lw=0.8)
    ax.set_ylabel("count")
    ax2 = ax.twinx()
    ax2.plot(t, series("backlog_tokens"), color="0.6", lw=0.8, label="backlog tokens (right)")
    ax2.set_ylabel("backlog tokens")
    ax.legend(loc="upper left", fontsize=7, ncol=2)
    ax2.legend(loc="upper right", fontsize=7)
    for a in axes[:2]:
        a.legend(fontsize=7, ncol=3)
    for a in axes:
        a.grid(True, alpha=0.3)
        if run:
            mid = (run[0]["t"] + run[-1]["t"]) / 2 / 60
            a.axvspan(mid, run[-1]["t"] / 60, color="0.92", zorder=0)
    axes[-1].set_xlabel("minutes since the sessions were opened (shaded: second half)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
