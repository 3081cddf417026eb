"""The Markdown report, the targets of the issue, and the plots."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from marketbench.bounds import DecodeTraffic
from marketbench.results import Results, percentile

SESSION_ROW = "vllm-stateful"
FLASH_ROW = "vllm-stateful flash"
NO_PC_ROW = "vLLM, prefix caching off"
PC_ROW = "vLLM, prefix caching on"
BEGIN, END = "<!-- market-stream:begin -->", "<!-- market-stream:end -->"


def _ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f}" if x < 0.1 else f"{x * 1e3:.0f}"


def _ratio(x: float | None, base: float | None) -> str:
    return "-" if x is None or not base else f"{x / base:.2f}x"


def _k(n: float) -> str:
    return f"~{n / 1000:g}k" if n >= 1000 else f"~{n:g}"


def row_order(res: Results) -> list[str]:
    rows = [r for e in res.engines for r in e.rows]
    return [r for r in rows if r in set(res.rows())] or res.rows()


def buckets(res: Results, workload: str) -> list[int]:
    return sorted({q.bucket for q in res.queries if q.workload == workload})


def workloads(res: Results) -> list[str]:
    return list(dict.fromkeys(q.workload for q in res.queries))


def _p(
    res: Results, row: str, workload: str, what: str, p: float, bucket: int | None = None
) -> float | None:
    qs = res.select(row, workload, bucket)
    if row == FLASH_ROW:
        qs = [q for q in qs if q.flash]
    return percentile((getattr(q, what) for q in qs), p)


def tpot(q) -> float | None:
    """Time per decoded token after the first, from a streamed answer."""
    if q.ttft_s is None or q.completion_tokens < 2:
        return None
    return (q.e2e_s - q.ttft_s) / (q.completion_tokens - 1)


@dataclass(frozen=True)
class Target:
    name: str
    measured: str
    met: bool | None  # None: not measured in this run


def targets(res: Results, traffic: DecodeTraffic | None) -> list[Target]:
    out: list[Target] = []
    wl = "a" if "a" in workloads(res) else (workloads(res) or [None])[0]
    bs = buckets(res, wl) if wl else []
    if len(bs) >= 2:
        lo, hi = bs[0], bs[-1]
        t_lo, t_hi = (
            _p(res, SESSION_ROW, wl, "ttft_s", 50, lo),
            _p(res, SESSION_ROW, wl, "ttft_s", 50, hi),
        )
        if t_lo and t_hi:
            r = t_hi / t_lo
            waited = [
                sum(1 for q in res.select(SESSION_ROW, wl, b) if q.pending_ingest) for b in (lo, hi)
            ]
            n = [len(res.select(SESSION_ROW, wl, b)) for b in (lo, hi)]
            out.append(Target(
                f"flat: vllm-stateful TTFT p50 at {_k(hi)} <= 1.25x its p50 at {_k(lo)} ({wl})",
                f"{_ms(t_hi)} / {_ms(t_lo)} ms = {r:.2f}x (questions that waited for their last append's "
                f"ingestion: {waited[1]}/{n[1]} and {waited[0]}/{n[0]})",
                r <= 1.25,
            ))  # fmt: skip
        e_lo, e_hi = (
            _p(res, SESSION_ROW, wl, "e2e_s", 50, lo),
            _p(res, SESSION_ROW, wl, "e2e_s", 50, hi),
        )
        if e_lo and e_hi:
            c_lo = percentile((q.context for q in res.select(SESSION_ROW, wl, lo)), 50)
            c_hi = percentile((q.context for q in res.select(SESSION_ROW, wl, hi)), 50)
            bound = traffic.ratio(int(c_hi), int(c_lo)) if traffic and c_lo and c_hi else None
            text = f"{_ms(e_hi)} / {_ms(e_lo)} ms = {e_hi / e_lo:.2f}x"
            d_lo, d_hi = (
                percentile((tpot(q) for q in res.select(SESSION_ROW, wl, b)), 50) for b in (lo, hi)
            )
            if d_lo and d_hi:
                text += f"; per decoded token {_ms(d_hi)} / {_ms(d_lo)} ms = {d_hi / d_lo:.2f}x"
            if bound:
                text += (
                    f"; memory-traffic bound {bound:.2f}x (weights {traffic.weight_bytes / 1e6:.0f} MB "
                    f"+ {traffic.kv_bytes_per_token / 1e3:.1f} KB per context token per decoded token)"
                )
            out.append(
                Target(
                    f"end to end at {_k(hi)} vs {_k(lo)} (reported against the bound)", text, None
                )
            )
        for row, need, w in (
            (NO_PC_ROW, 5.0, wl),
            (PC_ROW, 2.0, "c8" if "c8" in workloads(res) else None),
        ):
            if w is None:
                out.append(Target(f"vllm-stateful >= {need:g}x faster p50 than {row} at the largest "
                                  "context (c8)", "workload not run", None))  # fmt: skip
                continue
            top = buckets(res, w)[-1]
            base = _p(res, SESSION_ROW, w, "e2e_s", 50, top)
            other = _p(res, row, w, "e2e_s", 50, top)
            name = f"vllm-stateful >= {need:g}x faster p50 than {row} at {_k(top)} ({w})"
            if base and other:
                out.append(
                    Target(
                        name,
                        f"{_ms(other)} / {_ms(base)} ms = {other / base:.2f}x",
                        other / base >= need,
                    )
                )
            else:
                out.append(Target(name, "not measured", None))
    hits = [q for q in res.queries if q.row == FLASH_ROW and q.flash and q.error is None]
    if hits:
        server = [q.server_s for q in hits if q.server_s is not None]
        if server:
            p99, how = percentile(server, 99), "server-side"
        else:
            p99, how = (
                percentile((q.e2e_s for q in hits), 99),
                "HTTP round trip on loopback (no server-side time exposed)",
            )
        out.append(
            Target(
                "flash hits: p99 under 5 ms", f"{_ms(p99)} ms, {how}, {len(hits)} hits", p99 < 0.005
            )
        )
    return out


def markdown(res: Results, traffic: DecodeTraffic | None) -> str:
    m = res.meta
    L: list[str] = []
    add = L.append
    add(f"Command: `{m['command']}`  ")
    add(f"Machine: {m['machine']}  ")
    add(f"Software: {m['software']}  ")
    add(f"Model: {m['model']}  ")
    add(f"Data: {m['data']}  ")
    add(f"Run: {m['started']}, {m['wall_s'] / 60:.1f} min")
    add("")
    add("### Engines")
    add("")
    add("| engine | status | precision | configuration beyond defaults |")
    add("|---|---|---|---|")
    for e in res.engines:
        # A runnable engine's reason is about one of its rows (e.g. no flash route).
        sep = " (" if e.status == "ran" else ": "
        status = (
            e.status
            if e.reason is None
            else f"{e.status}{sep}{e.reason}{')' if sep == ' (' else ''}"
        )
        add(f"| {e.label} | {status} | {e.precision or '-'} | {e.configuration or '-'} |")
    add("")
    add("### Workloads")
    add("")
    add(
        "| workload | sessions | contexts where questions fall (tokens) | questions | background churn |"
    )
    add("|---|---|---|---|---|")
    for w in m["workloads"]:
        churn = m["churn"] if w["churn"] else "-"
        add(f"| {w['name']}: {w['title']} | {w['sessions']} | {', '.join(map(str, w['buckets']))} | "
            f"{w['questions']} | {churn} |")  # fmt: skip
    add("")
    add("### Summary")
    add("")
    add(
        "Latencies in ms, client-side over HTTP; the ratio compares end-to-end p50 at the largest "
        'context with vllm-stateful\'s. Flash rows count hits only. "Same answer": share of '
        "answers equal to stock vLLM's (prefix caching off) on the same tokens; in bf16 a "
        "different prefill split can change low bits and flip a greedy token."
    )
    add("")
    add(
        "| workload | engine | answered | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 "
        "| e2e p50 at largest context | vs vllm-stateful | questions/s | peak RSS (GB) "
        "| KV tokens pinned | prefix-cache hit rate | same answer |"
    )
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    runs = {(r.row, r.workload): r for r in res.runs}
    reference = {q.key: q.text for q in res.select(NO_PC_ROW)}
    for w in workloads(res):
        top = buckets(res, w)[-1]
        base = _p(res, SESSION_ROW, w, "e2e_s", 50, top)
        for row in row_order(res):
            run = runs.get((row, w))
            if run is None:
                continue
            at_top = _p(res, row, w, "e2e_s", 50, top)
            hit = run.prefix_cache_hit_rate
            compared = [q for q in res.select(row, w) if q.key in reference]
            same = sum(1 for q in compared if q.text == reference[q.key])
            cells = [
                w,
                row,
                f"{run.answered}/{run.questions}",
                _ms(_p(res, row, w, "ttft_s", 50)),
                _ms(_p(res, row, w, "ttft_s", 99)),
                _ms(_p(res, row, w, "e2e_s", 50)),
                _ms(_p(res, row, w, "e2e_s", 99)),
                _ms(at_top),
                "-" if row in (SESSION_ROW, FLASH_ROW) else _ratio(at_top, base),
                f"{run.answered / run.wall_s:.2f}",
                f"{run.peak_rss_bytes / 1e9:.2f}",
                "-" if run.pinned_tokens is None else str(run.pinned_tokens),
                "-" if hit is None else f"{hit:.0%}",
                f"{same}/{len(compared)}" if compared and row != NO_PC_ROW else "-",
            ]
            add("| " + " | ".join(cells) + " |")
        for e in res.engines:
            if e.status not in ("ran", "not selected"):
                add(f"| {w} | {e.rows[0]} | {e.status} |" + " |" * 11)
    add("")
    for w in workloads(res):
        bs = buckets(res, w)
        if len(bs) < 2:
            continue
        rows = [r for r in row_order(res) if r != FLASH_ROW and res.select(r, w)]
        add(f"### Latency by context, workload {w}")
        add("")
        add("End-to-end p50 / TTFT p50 in ms (ratio of end-to-end p50 to vllm-stateful's).")
        add("")
        add("| context | " + " | ".join(rows) + " |")
        add("|---|" + "---|" * len(rows))
        for b in bs:
            base = _p(res, SESSION_ROW, w, "e2e_s", 50, b)
            cells = []
            for r in rows:
                e, t = _p(res, r, w, "e2e_s", 50, b), _p(res, r, w, "ttft_s", 50, b)
                cell = f"{_ms(e)} / {_ms(t)}"
                if r != SESSION_ROW and e is not None and base:
                    cell += f" ({e / base:.1f}x)"
                cells.append(cell)
            add(f"| {_k(b)} | " + " | ".join(cells) + " |")
        add("")
    flash = [q for q in res.queries if q.row == FLASH_ROW]
    if flash:
        add("### Flash hits")
        add("")
        add(
            "A question answered from the flash cache: server-side time (vllm-stateful's `Server-Timing` "
            'header: time in the route handler) and the HTTP round trip on loopback. "Pushed after": how '
            "long the client waited for the pushed answer of the newest version before asking."
        )
        add("")
        add(
            "| workload | hits / asked | server p50 (ms) | server p99 (ms) | HTTP p50 (ms) | HTTP p99 (ms) "
            "| pushed after, p50 (ms) |"
        )
        add("|---|---|---|---|---|---|---|")
        for w in workloads(res):
            qs = [q for q in flash if q.workload == w and q.error is None]
            if not qs:
                continue
            hits = [q for q in qs if q.flash]
            server = [q.server_s for q in hits if q.server_s is not None]
            http = [q.e2e_s for q in hits]
            add(f"| {w} | {len(hits)}/{len(qs)} | {_ms(percentile(server, 50))} | {_ms(percentile(server, 99))} | "
                f"{_ms(percentile(http, 50))} | {_ms(percentile(http, 99))} | "
                f"{_ms(percentile((q.flash_wait_s for q in qs), 50))} |")  # fmt: skip
        add("")
    apps = [a for a in res.appends if a.row == SESSION_ROW]
    if apps:
        add("### Append to ingested (vllm-stateful)")
        add("")
        add(
            "From sending an append to the `ingested` event that covers it (appends that pile up are "
            "coalesced into one ingestion)."
        )
        add("")
        add("| workload | appends | lag p50 (ms) | lag p99 (ms) | max (ms) | not seen |")
        add("|---|---|---|---|---|---|")
        for w in workloads(res):
            lags = [a.lag_s for a in apps if a.workload == w]
            seen = [x for x in lags if x is not None]
            if lags:
                add(f"| {w} | {len(lags)} | {_ms(percentile(seen, 50))} | {_ms(percentile(seen, 99))} | "
                    f"{_ms(max(seen) if seen else None)} | {len(lags) - len(seen)} |")  # fmt: skip
        add("")
    tg = targets(res, traffic)
    if tg:
        add("### Targets")
        add("")
        add("| target | measured | met |")
        add("|---|---|---|")
        for t in tg:
            add(
                f"| {t.name} | {t.measured} | {'-' if t.met is None else ('yes' if t.met else 'no')} |"
            )
        add("")
    notes = [f"{r.row} / {r.workload}: {n}" for r in res.runs for n in r.notes]
    if notes:
        add("Notes: " + "; ".join(notes) + ".")
        add("")
    return "\n".join(L)


def update_readmes(md: str, paths: Sequence[Path], plots: Sequence[Path]) -> list[Path]:
    """Replace the text between the markers in each file that has them."""
    done = []
    for path in paths:
        if not path.exists():
            continue
        text = path.read_text()
        if BEGIN not in text or END not in text:
            continue
        imgs = "\n".join(f"![{p.stem}]({os.path.relpath(p, path.parent)})" for p in plots)
        block = f"{BEGIN}\n{md}\n{imgs}\n{END}"
        text = re.sub(
            re.escape(BEGIN) + ".*?" + re.escape(END), lambda _, b=block: b, text, flags=re.S
        )
        path.write_text(text)
        done.append(path)
    return done


def plots(res: Results, out_dir: Path, stem: str) -> list[Path]:
    """latency vs context (p50 per bucket, per engine) and latency CDFs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    wls = [w for w in workloads(res) if len(buckets(res, w)) >= 2]
    rows = row_order(res)
    colors = {r: f"C{i}" for i, r in enumerate(rows)}
    if wls:
        fig, axes = plt.subplots(1, len(wls), figsize=(5 * len(wls), 4), squeeze=False)
        for ax, w in zip(axes[0], wls):
            for r in rows:
                if r == FLASH_ROW:
                    continue
                xs, e2e, ttft = [], [], []
                for b in buckets(res, w):
                    qs = res.select(r, w, b)
                    if not qs:
                        continue
                    xs.append(percentile((q.context for q in qs), 50))
                    e2e.append(percentile((q.e2e_s for q in qs), 50))
                    ttft.append(percentile((q.ttft_s for q in qs), 50))
                if xs:
                    ax.plot(xs, e2e, "o-", color=colors[r], label=f"{r} (end to end)")
                    if all(t is not None for t in ttft):
                        ax.plot(xs, ttft, "x--", color=colors[r], alpha=0.6, label=f"{r} (TTFT)")
            ax.set_yscale("log")
            ax.set_xlabel("context (tokens)")
            ax.set_ylabel("p50 latency (s)")
            ax.set_title(f"workload {w}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}_latency_vs_context.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    wl_all = workloads(res)
    if wl_all:
        fig, axes = plt.subplots(1, len(wl_all), figsize=(5 * len(wl_all), 4), squeeze=False)
        for ax, w in zip(axes[0], wl_all):
            for r in rows:
                qs = res.select(r, w)
                if r == FLASH_ROW:
                    qs = [q for q in qs if q.flash]
                xs = sorted(q.e2e_s for q in qs)
                if xs:
                    ys = [(i + 1) / len(xs) for i in range(len(xs))]
                    ax.step(xs, ys, where="post", color=colors[r], label=r)
            ax.set_xscale("log")
            ax.set_xlabel("end-to-end latency (s)")
            ax.set_ylabel("fraction of questions")
            ax.set_title(f"workload {w}")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{stem}_latency_cdf.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
