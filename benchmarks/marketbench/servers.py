"""One engine server at a time, as a subprocess in its own process group.

Startup waits for the engine's health route; the server's whole process
tree (API server, engine core, workers) is sampled for resident memory
while it runs; stopping ends exactly that group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


class ServerFailed(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MemorySampler:
    """Peak resident memory of a process tree (sum over its processes)."""

    pid: int
    period_s: float = 0.5
    peak_bytes: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.peak_bytes = 0

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def sample(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.sample())
            self._stop.wait(self.period_s)


class Server:
    def __init__(
        self, argv: list[str], env: dict[str, str], port: int, health_path: str, log_path: Path
    ):
        self.argv, self.port, self.health_path, self.log_path = argv, port, health_path, log_path
        self.env = {**os.environ, **env}
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.memory: MemorySampler | None = None
        self.startup_s = 0.0

    def start(self, timeout_s: float) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        t0 = time.monotonic()
        # Own process group: stop() ends the API server and every process it
        # spawned, and nothing else.
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = t0 + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.base_url + self.health_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise ServerFailed(f"server not healthy after {timeout_s:.0f} s:\n{self.tail()}")
            time.sleep(0.5)
        self.startup_s = time.monotonic() - t0
        self.memory = MemorySampler(self.proc.pid)
        self.memory.start()

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.memory is not None:
            self.memory.stop()
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # Children (the engine core) may outlive the parent for a moment.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc = None


def prometheus_counters(text: str, names: tuple[str, ...]) -> dict[str, float]:
    """Sum of each named counter over its label sets, from /metrics text."""
    out = {n: 0.0 for n in names}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        for n in names:
            if line.startswith(n + "{") or line.startswith(n + " "):
                try:
                    out[n] += float(line.rsplit(" ", 1)[1])
                except ValueError:
                    pass
    return out


PREFIX_CACHE_COUNTERS = ("vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total")


async def prefix_cache_counters(http: httpx.AsyncClient) -> dict[str, float] | None:
    """vLLM's prefix-cache query/hit token counters; None where the engine
    has no such metrics (llama.cpp)."""
    try:
        r = await http.get("/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    return prometheus_counters(r.text, PREFIX_CACHE_COUNTERS)
