"""The market-data benchmark's smoke run, so the benchmark never rots.

``benchmarks/market_stream.py --smoke`` serves the tiny model (float32) from
vllm-stateful and from stock vLLM, one after the other, replays real ticks
into one session and asks a few questions; it exits non-zero unless every
engine answered every question and vllm-stateful's answers (session queries
and flash hits) equal stock vLLM's on the same token ids.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_market_stream_smoke(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "market_stream.py"),
            "--smoke",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "vllm-stateful == stock vLLM" in proc.stderr

    res = json.loads((tmp_path / "market_stream.json").read_text())
    runs = {r["row"]: r for r in res["runs"]}
    assert set(runs) >= {"vllm-stateful", "vllm-stateful flash", "vLLM, prefix caching off"}
    for run in runs.values():
        assert run["answered"] == run["questions"] == 3
    by_row: dict[str, dict] = {}
    for q in res["queries"]:
        by_row.setdefault(q["row"], {})[(q["session"], q["step"], q["ask"])] = q
    stock = by_row["vLLM, prefix caching off"]
    for row in ("vllm-stateful", "vllm-stateful flash"):
        assert by_row[row].keys() == stock.keys()
        for key, q in by_row[row].items():
            assert q["text"] == stock[key]["text"]
            assert q["context"] == stock[key]["context"]  # same token sequences
    assert all(q["flash"] for q in by_row["vllm-stateful flash"].values())
    # A session question computes its own tokens, not the context.
    for q in by_row["vllm-stateful"].values():
        assert q["computed_tokens"] < q["context"]

    engines = {e["key"]: e for e in res["engines"]}
    if shutil.which("nvidia-smi") is None:
        for key in ("sglang", "trtllm"):
            assert engines[key]["status"] == "not runnable here"
            assert "no CUDA device" in engines[key]["reason"]
    table = (tmp_path / "market_stream.md").read_text()
    assert "| smoke | vllm-stateful |" in table


def test_live_stream_smoke(tmp_path: Path) -> None:
    """``benchmarks/live_stream.py --smoke``: the tiny model, 1 and 2 sessions
    fed ticks open loop at 50% and 200% of the measured capacity, with
    questions during the stream, on vllm-stateful and stock vLLM. The JSON
    carries every reported field, and every acknowledged append is in its
    session (session tokens = prefix + acknowledged tokens). With
    ``--capacity-by-sessions`` each level's feed is its load's share of the
    capacity measured with its own number of streams."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "live_stream.py"), "--smoke",
         "--capacity-by-sessions", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "live_stream.json").read_text())

    meta = res["meta"]
    for key in ("cpu", "cpu_flags", "vllm", "dtype", "model", "parameters", "questions"):
        assert meta[key], key
    assert meta["dtype"] == "float32"
    assert res["capacity"]["tps"] > 0
    by = res["capacity_by_sessions"]
    assert set(by) == {"1", "2"} and by["1"] == res["capacity"]
    assert by["2"]["sessions"] == 2 and by["2"]["tps"] > 0
    # One run (smoke), both streams fed their 256 tokens (whole lines: a few more).
    [run2] = by["2"]["runs"]
    assert 2 * 256 <= run2["tokens"] < 2 * (256 + 64)
    assert res["evaluation_ms"] > 0
    assert set(res["idle"]) == {"vllm-stateful", "vLLM, prefix caching on"}

    levels = {(lv["engine"], lv["sessions"], lv["load"]): lv for lv in res["levels"]}
    assert set(levels) == {(e, n, load) for e in res["idle"] for n in (1, 2) for load in (0.5, 2.0)}
    fields = (
        "p50_s", "p99_s", "idle_p50_s", "idle_p99_s", "lag_first_half_p50_s",
        "lag_second_half_p99_s", "flash_asks", "flash_hits", "flash_hit_rate",
        "staleness_p50_ms", "http_429", "retry_wait_s", "backlog_max_tokens",
        "all_appends_in_session", "tokens_acknowledged",
    )  # fmt: skip
    for (engine, n, load), lv in levels.items():
        # The feed leaves room for a rotated stream's fresh window.
        rotate_at, start = meta["rotate_at"][str(n)], meta["args"]["start_context"]
        want = load * by[str(n)]["tps"] * (rotate_at - start) / rotate_at
        assert lv["offered_tps"] == pytest.approx(want, rel=1e-9)
        s = lv["summary"]
        for f in fields:
            assert f in s, f
        assert s["questions"] > 0 and s["answered"] == s["questions"]
        assert s["p50_s"] > 0 and s["idle_p50_s"] > 0
        if engine != "vllm-stateful":
            continue
        assert s["appends_acknowledged"] > 0 and s["lag_first_half_p50_s"] is not None
        # The engine's step trace covers the level: it was busy, and every
        # computed question sent during the feed has its in-flight wait.
        et = lv["engine_time"]
        assert 0 < et["busy_share"] <= 1 and et["steps"] > 0
        sent = [q for q in lv["asked"] if not q["flash"] and q["t_start"] < lv["duration_s"]]
        assert et["arrivals"] == len(sent) > 0
        assert min(et["in_flight_waits_s"]) >= 0
        assert lv["backlog"], "backlog sampled over time"
        # Every acknowledged append is in its session: each session (a
        # stream rotates to a new one at its window) holds its prefix plus
        # exactly the tokens acknowledged to it, and the sessions together
        # account for every acknowledged token.
        assert s["all_appends_in_session"] is True
        for v in lv["verification"]:
            assert v["session_tokens"] == v["prefix_tokens"] + v["acknowledged_tokens"]
            assert v["session_version"] == v["acknowledged_version"]
        assert sum(v["acknowledged_tokens"] for v in lv["verification"]) == s["tokens_acknowledged"]
    assert (tmp_path / "live_stream.md").read_text().count("| vllm-stateful |") == 4


def test_speculation_smoke(tmp_path: Path) -> None:
    """``benchmarks/speculation.py --smoke``: the tiny model served with
    speculation off and with n-gram drafts, 1 and 2 sessions, copy-heavy and
    other questions. Every answer arrives, greedy answers are equal with and
    without speculation, and the JSON carries every reported figure."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "speculation.py"), "--smoke",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads((tmp_path / "speculation_smoke.json").read_text())
    meta = res["meta"]
    assert meta["cpu"] and isinstance(meta["cpu_flags"], list) and meta["dtype"] == "float32"
    assert res["status"]["off"] == res["status"]["ngram"] == "ran"
    assert res["status"]["llama.cpp"].startswith("not run")
    rows = {(r["mode"], r["sessions"], r["kind"]): r for r in res["rows"]}
    assert set(rows) == {(m, n, k) for m in ("off", "ngram") for n in (1, 2) for k in ("copy", "other")}
    for (mode, n, kind), r in rows.items():
        # 3 questions of each kind per session, one round per level.
        assert r["answers"] == 3 * n, (mode, n, kind)
        assert r["ms_per_token_p50"] > 0 and r["latency_ms_p50"] > 0
        assert r["speedup_vs_off"] is not None
        assert r["draft_tokens"] is not None  # read from /metrics
        if mode == "off":
            assert r["draft_tokens"] == 0
    assert res["same_answers"]["ngram"] == [18, 18]  # (1 + 2 sessions) x 6 questions
    # A session question computes its own tokens, not the context (fewer
    # when the previous question's full block shares its opening words).
    assert all(0 < a["computed_tokens"] <= a["question_tokens"] for a in res["asks"])
    assert "| sessions | questions | setting |" in (tmp_path / "speculation_smoke.md").read_text()


def test_soak_smoke(tmp_path: Path) -> None:
    """``benchmarks/soak.py --smoke``: the tiny model, 4 sessions fed ticks
    for 30 s with questions, flash queries and an event stream each,
    rotated to fresh sessions as they fill. Samples come at the interval,
    every verdict is computed, engine and API never disagree, and with the
    sessions closed nothing is left: no session, pin, subscriber, backlog."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "soak.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "soak.json").read_text())
    meta = res["meta"]
    assert meta["cpu"] and meta["vllm"] and meta["interval_s"] == 3.0 and meta["sessions"] == 4

    samples = res["samples"]
    assert [s["phase"] for s in samples[:2]] == ["baseline", "run"]
    assert samples[-1]["phase"] == "end"
    run = [s for s in samples if s["phase"] == "run"]
    # One sample every 3 s over the 30 s feed, plus the sessions' setup and drain.
    assert len(run) >= 10
    gaps = sorted(b["t"] - a["t"] for a, b in zip(run, run[1:]))
    assert 2.7 < gaps[len(gaps) // 2] < 3.3 and gaps[-1] < 10, gaps
    for s in samples:
        assert s["rss_mb"] > 0 and s["engine_rss_mb"] > 0
        assert s["mismatches"] == 0 and s["reconcile_agree"] is True
        for key in ("pinned_blocks", "free_blocks", "event_subscribers", "event_queue_max",
                    "backlog_tokens", "sessions", "sessions_ending", "requests_waiting"):  # fmt: skip
            assert s[key] is not None, key
    # While streaming: one open event stream per session, read by the client.
    assert max(s["event_subscribers"] for s in run) >= 4
    assert max(s["pinned_blocks"] for s in run) > 0

    verdicts = {v["name"]: v for v in res["verdicts"]}
    assert set(verdicts) == {"rss_slope", "pinned_bounded", "queues_bounded", "reconcile",
                             "released_at_end", "appends_kept"}  # fmt: skip
    assert all(v["verdict"] in ("PASS", "FAIL") and v["measured"] for v in verdicts.values())
    # RSS over 30 s is warm-up, not a trend: computed, not judged here.
    assert res["figures"]["rss_mb_slope_per_min"] is not None
    for name in ("pinned_bounded", "queues_bounded", "reconcile", "released_at_end", "appends_kept"):
        assert verdicts[name]["verdict"] == "PASS", verdicts[name]
    assert res["figures"]["reconcile_mismatches"] == 0
    end = res["figures"]["end"]
    assert end == {"sessions": 0, "sessions_ending": 0, "engine_pins": 0, "pinned_blocks": 0,
                   "event_subscribers": 0, "backlog_tokens": 0, "engine_pinned_tokens": 0}  # fmt: skip
    assert res["figures"]["free_blocks_end"] == res["figures"]["free_blocks_baseline"]

    act = res["activity"]
    assert act["rotations"] > 0 and act["sessions_opened"] == act["sessions_closed"]
    assert act["summary"]["answered"] == act["summary"]["questions"] > 0
    # One flash query per session, two on every other stream.
    assert act["sessions_opened"] < act["flash_registered"] < 2 * act["sessions_opened"]
    md = (tmp_path / "soak.md").read_text()
    assert "| reconcile |" in md and "CPU: " in md
    assert (tmp_path / "soak.png").stat().st_size > 0


def test_durability_smoke(tmp_path: Path) -> None:
    """``benchmarks/durability.py --smoke``: the tiny model through every
    measurement; the script itself asserts that a brought-back session
    computed one token and a restart from disk computed almost nothing."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "durability.py"), "--smoke",
         "--out", str(tmp_path / "durability")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-6000:]
    res = json.loads((tmp_path / "durability.json").read_text())
    settings = {(r["mode"], r["sessions"], r["engine"]) for r in res["appends"]}
    assert settings == {
        (m, n, e) for m in ("off", "group", "each") for n in (1, 16) for e in ("quiet", "ingesting")
    }
    for r in res["appends"]:
        assert r["n"] == 4 * r["sessions"] and 0 < r["p50_ms"] <= r["p99_ms"]
    [off] = res["offload"]
    assert len(off["bring_back_s"]) == len(off["recompute_s"]) == 1
    [restart] = res["restart"]
    assert len(restart["recompute_s"]) == len(restart["disk_s"]) == 1
    assert "Append acknowledgement" in (tmp_path / "durability.md").read_text()


def test_live_report_medians_over_runs(monkeypatch) -> None:
    """``live_stream.py --repeats``: one row per level run more than once,
    each figure the median over its runs, next to every run's value; levels
    run once have no row. Expected strings are worked out by hand."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from livebench import report

    def level(engine: str, repeat: int, repeats: int, p50: float, p99: float,
              lag1: float, lag2: float, hits: int, asks: int) -> dict:  # fmt: skip
        return {"engine": engine, "sessions": 4, "load": 0.5, "repeat": repeat,
                "repeats": repeats, "summary": {
                    "p50_vs_idle": p50, "p99_vs_idle": p99, "lag_first_half_p50_s": lag1,
                    "lag_second_half_p50_s": lag2, "flash_hits": hits, "flash_asks": asks}}  # fmt: skip

    runs = [
        level("vllm-stateful", 0, 3, 1.2, 1.5, 1.0, 1.5, 50, 60),
        level("vllm-stateful", 1, 3, 1.4, 1.1, 1.0, 1.0, 55, 60),
        level("vllm-stateful", 2, 3, 1.3, 2.0, 0.8, 1.2, 58, 60),
    ]
    once = [level("vLLM, prefix caching on", 0, 1, 9.0, 9.0, 0.0, 0.0, 0, 0)]
    lines = report.medians(runs + once).splitlines()
    assert len(lines) == 3  # header, rule, one level
    assert lines[2] == (
        "| vllm-stateful | 4 | 50% | 3 | 1.30x (1.20x, 1.40x, 1.30x) | 1.50x (1.50x, 1.10x, 2.00x) "
        "| 2nd/1st 1.50x (1000 -> 1500; 1000 -> 1000; 800 -> 1200) | 163/180 |"
    )
    assert report.medians(once) == ""


def test_live_engine_time_from_the_step_trace(monkeypatch, tmp_path: Path) -> None:
    """``livebench.steps``: the busy share of a level's window by kind of
    step, and for each question sent the rest of the step then in flight
    (0 when the engine was idle), from trace lines ``[end, duration,
    requests, lag]``. Expected values are worked out by hand."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from livebench import steps

    fg, ingest, flash = 0, 1, 2  # request classes (vllm_stateful.kv.lanes.Lane)
    lines = [
        [0.1, 0.1, [[ingest, 30, 2000], [flash, 1, 2100]], 0.5],  # 0.00-0.10
        [0.14, 0.04, [[fg, 1, 900]], 0.0],  # 0.10-0.14
        [0.3, 0.1, [[flash, 20, 2120]], 0.0],  # 0.20-0.30
        [0.6, 0.1, [[ingest, 64, 3000]], 1.2],  # 0.50-0.60
        [2.0, 0.1, [[ingest, 64, 3064]], 1.2],  # after the window
    ]
    trace = tmp_path / "steps.jsonl"
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines) + '[2.1, 0.0')  # cut short
    read = steps.read(trace, 0.05, 1.05)
    assert [round(s.start, 6) for s in read] == [0.0, 0.1, 0.2, 0.5]
    assert read[0].lanes == {ingest, flash}
    et = steps.engine_time(read, 0.05, 1.05, [0.12, 0.15, 0.25, 0.9])
    # In the window: 0.05 of the first step, then 0.04, 0.1 and 0.1.
    assert et["busy_share"] == pytest.approx(0.29)
    assert et["busy_share_by_kind"] == pytest.approx(
        {"flash": 0.1, "flash + ingestion": 0.05, "ingestion": 0.1, "questions": 0.04})
    assert et["steps"] == 4 and et["arrivals"] == 4
    # Sent at 0.12 (0.02 of the question step left), 0.15 (idle), 0.25
    # (0.05 of a flash step left), 0.9 (idle).
    assert et["in_flight_waits_s"] == pytest.approx([0.02, 0.0, 0.05, 0.0])
    assert et["in_flight_wait_p50_s"] == pytest.approx(0.01)
    assert et["in_flight_wait_mean_s"] == pytest.approx(0.0175)
    assert et["arrived_busy_share"] == 0.5
    assert et["step_p50_s_by_kind"] == pytest.approx(
        {"flash": 0.1, "flash + ingestion": 0.1, "ingestion": 0.1, "questions": 0.04})
    assert et["waited_behind"] == {"flash": (1, pytest.approx(0.05)),
                                   "questions": (1, pytest.approx(0.02))}
