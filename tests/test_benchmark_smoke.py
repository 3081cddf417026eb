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
