"""Sessions survive a crash: kill -9 of the whole server process group right
after a burst of acknowledged appends, then a restart on the same store.
Every session is back with the same token and every acknowledged version,
its flash queries registered, and a greedy question answers token-for-token
as before the kill."""

from __future__ import annotations

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil

from .conftest import _free_port, running, server_env, tiny_serve_args, vllm_command

QUESTION = {"prompt": " Last price?", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip


def kill_9(port: int) -> None:
    """SIGKILL the process group of the server listening on ``port`` (the
    API server and its engine core): nothing gets to clean up."""
    [pid] = {
        c.pid for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
    }  # fmt: skip
    group = os.getpgid(pid)
    os.killpg(group, signal.SIGKILL)
    psutil.wait_procs([psutil.Process(pid)], timeout=30)


def ask(http: httpx.Client, sid: str, token: str, **extra) -> dict:
    r = http.post(f"/v1/sessions/{sid}/completions", json={**QUESTION, **extra},
                  headers={"X-Session-Token": token})  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()


def test_sessions_survive_kill_9_and_restart(tiny_model_path, tmp_path):
    port = _free_port()
    cmd = vllm_command() + tiny_serve_args(tiny_model_path, port) + ["--plugin", "stateful"]
    env = server_env(VLLM_STATEFUL_STORE=str(tmp_path / "sessions.sqlite3"))
    before: dict[str, dict] = {}
    with running(cmd, env, port) as (base, _log):
        with httpx.Client(base_url=base, timeout=120) as http:
            opened = {}
            for i, prefix in enumerate(["EURUSD ticks:", "GBPUSD ticks: 1.2712", "USDJPY"]):
                r = http.post("/v1/sessions", json={"prefix": prefix, "ttl_s": 3600})
                assert r.status_code == 201, r.text
                opened[r.json()["id"]] = r.json()["token"]
            sid0 = next(iter(opened))
            r = http.post(f"/v1/sessions/{sid0}/flash", headers={"X-Session-Token": opened[sid0]},
                          json={"id": "last", "prompt": " Last?", "max_tokens": 4, "temperature": 0})  # fmt: skip
            assert r.status_code == 201, r.text

            def append(job: tuple[str, int]) -> int:
                sid, i = job
                r = http.post(f"/v1/sessions/{sid}/append", headers={"X-Session-Token": opened[sid]},
                              json={"text": f" {i}:1.08{i:02d}"})  # fmt: skip
                assert r.status_code == 202, r.text
                return r.json()["version"]

            jobs = [(sid, i) for i in range(15) for sid in opened]
            with ThreadPoolExecutor(8) as pool:
                versions = list(pool.map(append, jobs))
            for sid, token in opened.items():
                acked = max(v for (s, _), v in zip(jobs, versions) if s == sid)
                assert acked == 15
                answer = ask(http, sid, token, consistency="latest")
                assert answer["session"]["version"] == acked
                stats = http.get(f"/v1/sessions/{sid}", headers={"X-Session-Token": token}).json()
                before[sid] = {"version": acked, "tokens": stats["tokens"], "answer": answer}
        kill_9(port)

    with running(cmd, env, port) as (base, _log):
        with httpx.Client(base_url=base, timeout=120) as http:
            for sid, token in opened.items():
                # "ingested" waits until the restored versions are back.
                answer = ask(http, sid, token)
                was = before[sid]["answer"]
                assert answer["session"]["version"] == before[sid]["version"]
                assert answer["choices"][0]["token_ids"] == was["choices"][0]["token_ids"]
                assert answer["choices"][0]["text"] == was["choices"][0]["text"]
                stats = http.get(f"/v1/sessions/{sid}", headers={"X-Session-Token": token}).json()
                assert (stats["version"], stats["tokens"], stats["state"]) == (
                    before[sid]["version"], before[sid]["tokens"], "active",
                )  # fmt: skip
                assert stats["expires_at"] is not None
            # The token opens its own session only.
            other = [t for s, t in opened.items() if s != sid0][0]
            r = http.get(f"/v1/sessions/{sid0}", headers={"X-Session-Token": other})
            assert r.status_code == 403, r.text
            r = http.get(f"/v1/sessions/{sid0}/flash", headers={"X-Session-Token": opened[sid0]})
            assert r.status_code == 200, r.text
            assert [f["id"] for f in r.json()["data"]] == ["last"]
            for sid, token in opened.items():
                r = http.delete(f"/v1/sessions/{sid}", headers={"X-Session-Token": token})
                assert r.status_code in (200, 204), r.text
