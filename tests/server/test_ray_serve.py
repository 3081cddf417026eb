"""Scale-out on Ray Serve: two replicas of the tiny model on a local Ray
cluster bound to 127.0.0.1, behind one Serve HTTP endpoint.

Sessions created through the one URL spread over both replicas; a session
stays on its replica whichever route names it (path, header, or only the
body, as the OpenAI client sends it); its answers equal stateless
completions of the same token ids; closing frees its pins on its replica.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

ray = pytest.importorskip("ray")

from tests.server.conftest import BLOCK_SIZE, MAX_MODEL_LEN, NUM_BLOCKS  # noqa: E402

SESSIONS = 10
MAX_TOKENS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def scaled(tiny_model_path: str) -> Iterator[str]:
    """Two replicas on a local cluster; yields the one base URL."""
    from vllm_stateful.scale import cluster
    from vllm_stateful.scale.config import from_cli

    config = from_cli([
        tiny_model_path, "--replicas", "2", "--port", str(_free_port()),
        "--dtype", "float32", "--enforce-eager", "--max-model-len", str(MAX_MODEL_LEN),
        "--block-size", str(BLOCK_SIZE), "--num-gpu-blocks-override", str(NUM_BLOCKS),
    ])  # fmt: skip
    running = cluster.start_ray(config, address="")
    try:
        # Every Ray service on the loopback address only.
        assert {n["NodeManagerAddress"] for n in ray.nodes()} == {"127.0.0.1"}
        url = cluster.deploy(config)
        assert _network_listeners() == [], "Ray or a replica listens beyond 127.0.0.1"
        yield url
    finally:
        cluster.shutdown(running, config)


def _network_listeners() -> list[str]:
    """Listening TCP sockets on any address but the loopback one, of this
    process and everything it started (the local Ray cluster, its replicas
    and their vLLM engines)."""
    import psutil  # a vLLM dependency

    me = psutil.Process()
    ours = {me.pid, *(p.pid for p in me.children(recursive=True))}
    return [
        f"{c.laddr.ip}:{c.laddr.port} (pid {c.pid})"
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid in ours and not _loopback(c.laddr.ip)
    ]  # fmt: skip


def _loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or addr).is_loopback


@pytest.fixture
def http(scaled: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=scaled, timeout=120.0) as client:
        yield client


def _tokens(http: httpx.Client, text: str, special: bool) -> list[int]:
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": special})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def _stats(http: httpx.Client, sid: str, token: str) -> dict:
    r = http.get(f"/v1/sessions/{sid}", headers={"X-Session-Token": token})
    assert r.status_code == 200, r.text
    return r.json()


def _reconcile(http: httpx.Client, replica: str) -> dict:
    # Any id naming the replica routes there: an operator's way to address
    # one replica through the shared endpoint.
    r = http.get("/v1/stateful/reconcile", headers={"x-session-id": f"{replica}.probe"})
    assert r.status_code == 200, r.text
    return r.json()


def _stateless(http: httpx.Client, model: str, prompt: list[int]) -> list[int]:
    body = {"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True}  # fmt: skip
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_sessions_spread_stay_and_answer_exactly(http: httpx.Client, tiny_model_path: str):
    model = tiny_model_path
    question = _tokens(http, " What came last?", special=False)
    opened = []
    for i in range(SESSIONS):
        prefix = _tokens(http, f"Session {i}: " + "tick 1.25 up, " * (3 + i), special=True)
        r = http.post("/v1/sessions", json={"prefix": prefix})
        assert r.status_code == 201, r.text
        body = r.json()
        opened.append((body["id"], body["token"], prefix))

    replicas = {sid: _stats(http, sid, tok)["replica"] for sid, tok, _ in opened}
    counts = Counter(replicas.values())
    assert len(counts) == 2, counts  # both replicas hold sessions
    assert min(counts.values()) >= 3, counts  # placed by free budget: balanced
    for sid, replica in replicas.items():
        assert sid.startswith(replica + "."), (sid, replica)  # the id names its replica

    for n, (sid, tok, prefix) in enumerate(opened):
        headers = {"X-Session-Token": tok}
        # Through the path (the router sees the id).
        r = http.post(f"/v1/sessions/{sid}/completions", headers=headers, json={
            "model": model, "prompt": question, "max_tokens": MAX_TOKENS, "temperature": 0,
            "return_token_ids": True,
        })  # fmt: skip
        assert r.status_code == 200, r.text
        answer = r.json()["choices"][0]["token_ids"]
        assert answer == _stateless(http, model, prefix + question), sid
        # Through vLLM's own route with the id only in the body, as the
        # OpenAI client's extra_body sends it: about half arrive at the
        # other replica first and are handed on through Ray.
        body = {"model": model, "prompt": question, "max_tokens": MAX_TOKENS,
                "temperature": 0, "return_token_ids": True, "session_id": sid}  # fmt: skip
        r = http.post("/v1/completions", headers=headers, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == answer, sid
        if n == 0:  # streamed, also through the hand-over
            with http.stream("POST", "/v1/completions", headers=headers,
                             json={**body, "stream": True}) as resp:  # fmt: skip
                assert resp.status_code == 200
                chunks = [
                    json.loads(line[6:]) for line in resp.iter_lines()
                    if line.startswith("data: ") and line != "data: [DONE]"
                ]  # fmt: skip
            streamed = [t for c in chunks for t in (c["choices"][0].get("token_ids") or [])]
            assert streamed == answer
        # An append, then the session is still where it was.
        r = http.post(f"/v1/sessions/{sid}/append?wait=true", headers=headers,
                      json={"token_ids": question})  # fmt: skip
        assert r.status_code == 200, r.text
        assert _stats(http, sid, tok)["replica"] == replicas[sid]

    # Each replica pins exactly its own sessions; closing frees them there.
    for replica, count in counts.items():
        report = _reconcile(http, replica)
        assert report["agree"] and report["open_sessions"] == count, report
        assert report["engine_pins"] == count, report
    for sid, tok, _ in opened:
        r = http.delete(f"/v1/sessions/{sid}", headers={"X-Session-Token": tok})
        assert r.status_code == 200, r.text
    for replica in counts:
        report = _reconcile(http, replica)
        assert report["open_sessions"] == 0 and report["engine_pins"] == 0, report
        assert report["engine_pinned_tokens"] == 0 and report["pinned_blocks"] == 0, report


def test_client_chosen_ids_live_where_the_ring_looks(http: httpx.Client):
    """A create that names its id only in the body is handed to the id's
    owner on the hash ring, where later requests (routed by path) look."""
    made = []
    for i in range(4):
        r = http.post("/v1/sessions", json={"prefix": "hello", "session_id": f"client-{i}"})
        assert r.status_code == 201, r.text
        made.append((r.json()["id"], r.json()["token"]))
    try:
        for sid, tok in made:
            assert sid.startswith("client-")
            first = _stats(http, sid, tok)["replica"]
            for _ in range(3):
                assert _stats(http, sid, tok)["replica"] == first
    finally:
        for sid, tok in made:
            http.delete(f"/v1/sessions/{sid}", headers={"X-Session-Token": tok})


def test_unknown_and_dead_replica_ids_are_404(http: httpx.Client):
    for sid in ("nosuchreplica.0123", "never-made"):
        r = http.get(f"/v1/sessions/{sid}", headers={"X-Session-Token": "x"})
        assert r.status_code == 404, r.text
        assert r.json()["error"]["type"]


# ---------------------------------------------------------------- no cluster


def test_request_keys():
    from vllm_stateful.scale.session_keys import key_of, mint, replica_of

    assert key_of("POST", "/v1/sessions").creates
    assert key_of("GET", "/v1/sessions").creates is False
    assert key_of("GET", "/v1/sessions/abc/events").session_id == "abc"
    assert key_of("DELETE", "/v1/sessions/abc/").session_id == "abc"
    assert key_of("POST", "/v1/completions").session_id is None
    # Ray's session header wins, even on a create (a client-chosen id).
    assert key_of("POST", "/v1/sessions", "mine").session_id == "mine"
    sid = mint("r1x2")
    assert replica_of(sid) == "r1x2" and len(sid) == len("r1x2.") + 32
    assert replica_of("plain") is None and replica_of(".x") is None and replica_of("x.") is None


def test_command_line_split():
    from vllm_stateful.scale.config import ScaleUsageError, from_cli

    c = from_cli(["m", "--replicas=3", "--dtype", "float32", "--port", "9000",
                  "--plugin", "stateful", "--replica-cpus", "2"])  # fmt: skip
    assert (c.model, c.replicas, c.replica_cpus, c.host, c.port) == ("m", 3, 2.0, "127.0.0.1", 9000)
    assert c.vllm_args == ["--dtype", "float32"]
    assert from_cli(["--model", "m", "--replicas", "2"]).replica_argv == ["m"]
    for bad in (["--replicas", "2"], ["m", "--replicas", "0"], ["m", "--replicas"]):
        with pytest.raises(ScaleUsageError):
            from_cli(bad)


def test_core_binding_gives_each_replica_its_own_cores():
    from vllm_stateful.scale.replica import core_binding

    assert core_binding(0, 1, [0, 1]) == "0" and core_binding(1, 1, [0, 1]) == "1"
    assert core_binding(0, 2, [0, 1]) == "0,1"
    assert core_binding(2, 1, [0, 1]) is None  # more replicas than cores: vLLM's auto
