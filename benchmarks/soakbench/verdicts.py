"""The criteria of "no growth beyond the sessions' own data", from samples.

Sessions are held constant by rotation (a stream moves to a fresh session
before it outgrows its window), so what the server holds for them is
bounded; anything that still grows is a leak:

* rss_slope         resident memory of the server's process tree, least-
                    squares slope over the second half of the run (MB/min)
* pinned_bounded    at every sample the engine pins no more tokens than the
                    client's sessions hold, and no more blocks than those
                    tokens fill session by session
* queues_bounded    no event queue near the drop limit, no subscription
                    without a session, backlog within its bound, the
                    client's event streams all open while the sessions are
* reconcile         engine pins and API accounting agree at every sample
* released_at_end   with every session closed: no session, pin, subscriber
                    or backlog left, and every block free again
* appends_kept      every acknowledged append is in its session
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence
from typing import Any


@dataclass
class Verdict:
    name: str
    passed: bool
    measured: str
    limit: str

    @property
    def word(self) -> str:
        return "PASS" if self.passed else "FAIL"


def slope_per_min(points: Sequence[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, value) points, per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return None
    return 60.0 * sum((t - mx) * (v - my) for t, v in points) / var


def second_half(run: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    if not run:
        return []
    mid = (run[0]["t"] + run[-1]["t"]) / 2
    return [s for s in run if s["t"] >= mid]


def _max(rows: Sequence[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return None
    top = max(vals)
    # Gauges arrive as floats; counts read better as integers.
    return int(top) if float(top).is_integer() else top


def rss_figures(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    run = [s for s in samples if s["phase"] == "run"]
    half = second_half(run)
    out: dict[str, Any] = {"samples_run": len(run), "samples_second_half": len(half)}
    for key in ("rss_mb", "api_rss_mb", "engine_rss_mb"):
        out[f"{key}_slope_per_min"] = slope_per_min([(s["t"], s[key]) for s in half])
    if run:
        out.update(rss_start_mb=run[0]["rss_mb"], rss_end_mb=run[-1]["rss_mb"],
                   rss_max_mb=max(s["rss_mb"] for s in run),
                   rss_second_half_start_mb=half[0]["rss_mb"],
                   api_rss_start_mb=run[0]["api_rss_mb"], api_rss_end_mb=run[-1]["api_rss_mb"])  # fmt: skip
    base = [s for s in samples if s["phase"] == "baseline"]
    out["rss_baseline_mb"] = base[-1]["rss_mb"] if base else None
    return out


def judge(samples: Sequence[dict[str, Any]], *, max_rss_slope_mb_min: float, max_event_queue: int,
          backlog_bound: int, appends_kept: bool | None) -> tuple[list[Verdict], dict[str, Any]]:  # fmt: skip
    """Every criterion, and the figures behind them."""
    run = [s for s in samples if s["phase"] == "run"]
    base = [s for s in samples if s["phase"] == "baseline"]
    end = [s for s in samples if s["phase"] == "end"]
    fig = rss_figures(samples)
    verdicts = []

    slope = fig["rss_mb_slope_per_min"]
    verdicts.append(Verdict(
        "rss_slope", slope is not None and slope <= max_rss_slope_mb_min,
        "no second half" if slope is None else
        f"{slope:+.2f} MB/min over the second half ({fig['samples_second_half']} samples; API "
        f"{fig['api_rss_mb_slope_per_min']:+.2f}, engine {fig['engine_rss_mb_slope_per_min']:+.2f}); "
        f"RSS {fig['rss_start_mb']:.0f} -> {fig['rss_end_mb']:.0f} MB, max {fig['rss_max_mb']:.0f}",
        f"<= {max_rss_slope_mb_min:g} MB/min",
    ))  # fmt: skip

    probed = [s for s in run if s["pinned_blocks"] is not None]
    over_tokens = [s for s in probed if s["engine_pinned_tokens"] > s["tokens_bound"]]
    over_blocks = [s for s in probed if s["pinned_blocks"] > s["blocks_bound"]]
    ratio = [s["engine_pinned_tokens"] / s["tokens_bound"] for s in probed if s["tokens_bound"]]
    fig.update(pinned_blocks_max=_max(probed, "pinned_blocks"),
               pinned_blocks_second_half_max=_max(second_half(probed), "pinned_blocks"),
               blocks_bound_max=_max(probed, "blocks_bound"),
               pinned_tokens_max=_max(probed, "engine_pinned_tokens"),
               tokens_bound_max=_max(probed, "tokens_bound"),
               pinned_over_session_tokens_max=max(ratio, default=None),
               free_blocks_min=min((s["free_blocks"] for s in probed), default=None),
               total_blocks=probed[0]["total_blocks"] if probed else None)  # fmt: skip
    verdicts.append(Verdict(
        "pinned_bounded", bool(probed) and not over_tokens and not over_blocks,
        f"{len(over_tokens)} samples with more pinned tokens than the sessions hold, "
        f"{len(over_blocks)} with more pinned blocks than they fill, of {len(probed)}; pinned "
        f"blocks max {fig['pinned_blocks_max']} (second half {fig['pinned_blocks_second_half_max']}) "
        f"of {fig['total_blocks']}; pinned / session tokens max "
        + ("-" if fig["pinned_over_session_tokens_max"] is None
           else f"{fig['pinned_over_session_tokens_max']:.3f}"),
        "pinned tokens <= session tokens, pinned blocks <= their blocks, every sample",
    ))  # fmt: skip

    def bad(rows, pred) -> int:
        return sum(1 for s in rows if pred(s))

    q_full = bad(run, lambda s: s["event_queue_max"] is None or s["event_queue_max"] >= max_event_queue)
    orphan = bad(run, lambda s: s["event_subscribers"] is None
                 or s["event_subscribers"] > (s["sessions"] or 0) + (s["sessions_ending"] or 0))  # fmt: skip
    backlog = bad(run, lambda s: s["backlog_tokens"] is None or s["backlog_tokens"] > backlog_bound)
    streams = bad(run, lambda s: s["client_streams"] < s["client_sessions"])
    fig.update(event_queue_max=_max(run, "event_queue_max"),
               event_queue_max_second_half=_max(second_half(run), "event_queue_max"),
               event_subscribers_max=_max(run, "event_subscribers"),
               client_streams_max=_max(run, "client_streams"),
               backlog_tokens_max=_max(run, "backlog_tokens"),
               backlog_tokens_second_half_max=_max(second_half(run), "backlog_tokens"),
               requests_waiting_max=_max(run, "requests_waiting"),
               requests_running_max=_max(run, "requests_running"),
               sessions_min=min((s["sessions"] for s in run if s["sessions"] is not None), default=None),
               sessions_max=_max(run, "sessions"), sessions_ending_max=_max(run, "sessions_ending"))  # fmt: skip
    verdicts.append(Verdict(
        "queues_bounded", bool(run) and not (q_full or orphan or backlog or streams),
        f"event queue max {fig['event_queue_max']} (second half {fig['event_queue_max_second_half']}); "
        f"subscribers max {fig['event_subscribers_max']}, {orphan} samples with more subscribers than "
        f"sessions; backlog max {fig['backlog_tokens_max']} tokens (second half "
        f"{fig['backlog_tokens_second_half_max']}); {streams} samples with a session's event stream "
        f"closed; vLLM waiting requests max {fig['requests_waiting_max']}",
        f"event queue < {max_event_queue} (drop limit), subscribers <= sessions, backlog <= "
        f"{backlog_bound}, one open stream per session",
    ))  # fmt: skip

    probed_all = [s for s in samples if s["mismatches"] is not None]
    mismatches = sum(s["mismatches"] for s in probed_all)
    fig.update(reconcile_samples=len(probed_all), reconcile_mismatches=mismatches,
               reconcile_skipped_max=_max(probed_all, "reconcile_skipped"))  # fmt: skip
    verdicts.append(Verdict(
        "reconcile", bool(probed_all) and mismatches == 0,
        f"{mismatches} mismatches over {len(probed_all)} reconciliations "
        f"(sessions skipped as in flight: max {fig['reconcile_skipped_max']} per reconciliation)",
        "0 mismatches",
    ))  # fmt: skip

    if end:
        e = end[-1]
        free0 = base[-1]["free_blocks"] if base else None
        left = {k: e[k] for k in ("sessions", "sessions_ending", "engine_pins", "pinned_blocks",
                                  "event_subscribers", "backlog_tokens", "engine_pinned_tokens")}  # fmt: skip
        ok = all(v == 0 for v in left.values()) and (free0 is None or e["free_blocks"] == free0)
        fig.update(end=left, free_blocks_baseline=free0, free_blocks_end=e["free_blocks"],
                   rss_end_after_close_mb=e["rss_mb"])  # fmt: skip
        measured = (", ".join(f"{k} {v:g}" if v is not None else f"{k} -" for k, v in left.items())
                    + f"; free blocks {e['free_blocks']} (before the sessions: {free0})")  # fmt: skip
    else:
        ok, measured = False, "no sample after the sessions closed"
    verdicts.append(Verdict("released_at_end", ok, measured,
                            "all 0, free blocks as before the sessions"))  # fmt: skip

    verdicts.append(Verdict(
        "appends_kept", appends_kept is True,
        {True: "every session held its prefix + every acknowledged append",
         False: "some session lacked acknowledged appends", None: "not verified"}[appends_kept],
        "session tokens = prefix + acknowledged",
    ))  # fmt: skip
    return verdicts, fig
