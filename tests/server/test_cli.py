"""``vllm serve MODEL --plugin stateful`` and its alias ``vllm-stateful serve``:
what the flag sets and refuses, that it is inert unless asked, and the
literal command against a stock ``vllm serve``."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from vllm_stateful.cpu_dtype import cpu_dtype, cpu_flags
from vllm_stateful.serve_args import (
    KEEP_ALIVE_ENV,
    KEEP_ALIVE_S,
    UsageError,
    enable_plugin,
    plugins_allowlist,
    prepare_args,
)
from vllm_stateful.serve_flag import add_flag, asked, is_serve_parser

from .conftest import (
    _free_port,
    alias_command,
    running,
    server_env,
    tiny_serve_args,
    tokenize,
    vllm_command,
)

CONNECTOR = (
    '{"kv_connector": "StatefulConnector", '
    '"kv_connector_module_path": "vllm_stateful.kv.connector", "kv_role": "kv_both"}'
)


@pytest.fixture(scope="module")
def parser():
    from vllm_stateful.serve_args import serve_parser

    parser = serve_parser("vllm serve")
    add_flag(parser)
    return parser


@pytest.fixture
def parse(parser, monkeypatch):
    from vllm.entrypoints.cli.serve import ServeSubcommand

    # Parsing --plugin wraps ServeSubcommand.validate; undone after the test.
    monkeypatch.setattr(ServeSubcommand, "validate", ServeSubcommand.validate)
    return lambda *argv: parser.parse_args(list(argv))


def test_plugins_allowlist_keeps_what_the_user_enabled():
    assert plugins_allowlist(None, ["lora_a", "lora_b"]) == "lora_a,lora_b,stateful"
    assert plugins_allowlist("mine", ["lora_a"]) == "mine,stateful"
    assert plugins_allowlist("stateful,mine", []) == "stateful,mine"
    assert plugins_allowlist("", ["lora_a"]) == "stateful"  # "" enabled nothing


def test_server_idle_timeout_outlasts_clients_unless_set():
    env: dict[str, str] = {}
    enable_plugin(env)
    assert env[KEEP_ALIVE_ENV] == "30" == str(KEEP_ALIVE_S)
    env = {KEEP_ALIVE_ENV: "7"}
    enable_plugin(env)
    assert env[KEEP_ALIVE_ENV] == "7"


def test_server_keeps_an_idle_connection_past_vllms_default(server):
    """vLLM closes a connection idle for 5 s by default, httpx's own idle
    expiry (a request can then go out on a connection being closed); with
    the plugin the server keeps it ``KEEP_ALIVE_S``: after 6 s idle the
    next request goes over the same connection."""
    with server.http(limits=httpx.Limits(keepalive_expiry=60)) as http:
        first = http.get("/health")
        time.sleep(6)
        second = http.get("/health")
    assert first.status_code == second.status_code == 200
    assert first.extensions["network_stream"] is second.extensions["network_stream"]


def test_asked_only_by_the_flag():
    assert asked(["vllm", "serve", "m", "--plugin", "stateful"])
    assert asked(["vllm", "serve", "m", "--plugin=stateful"])
    assert not asked(["vllm", "serve", "m"])
    assert not asked(["vllm", "serve", "m", "--plugins-dir", "x"])
    assert not asked(["--plugin"])  # the program name is not an argument


def test_flag_only_on_serve_parsers():
    import argparse

    for prog, expected in [
        ("vllm serve", True),
        ("vllm-stateful serve", True),
        ("vllm bench serve", False),
        ("vllm run-batch", False),
        ("vllm", False),
    ]:
        assert is_serve_parser(argparse.ArgumentParser(prog=prog)) is expected, prog


def test_flag_parses_and_refuses_other_names(parse, capsys):
    assert parse("m").plugin is None
    assert parse("m", "--plugin", "stateful").plugin == "stateful"
    assert parse("m", "--plugin=stateful").plugin == "stateful"
    with pytest.raises(SystemExit):
        parse("m", "--plugin", "other")
    assert "invalid choice: 'other'" in capsys.readouterr().err


def test_prepare_sets_connector_prefix_caching_scheduler_and_model(parse):
    args = prepare_args(parse("some/model", "--block-size", "32"))
    assert args.model == "some/model"
    assert args.kv_transfer_config.kv_connector == "StatefulConnector"
    assert args.kv_transfer_config.kv_connector_module_path == "vllm_stateful.kv.connector"
    assert args.kv_transfer_config.kv_role == "kv_both"
    assert args.enable_prefix_caching is True and args.api_server_count == 1
    assert args.scheduler_cls == "vllm_stateful.kv.scheduler.StatefulScheduler"
    given = prepare_args(parse("m", "--kv-transfer-config", CONNECTOR))
    assert given.kv_transfer_config.kv_connector == "StatefulConnector"
    # A scheduler the user chose is kept.
    mine = prepare_args(parse("m", "--scheduler-cls", "my.Scheduler"))
    assert mine.scheduler_cls == "my.Scheduler"


def test_prepare_dtype(parse):
    # An explicit --dtype is kept, whatever the CPU.
    assert prepare_args(parse("m", "--dtype", "bfloat16")).dtype == "bfloat16"
    assert prepare_args(parse("m", "--dtype", "float16")).dtype == "float16"
    # Without one: float32 exactly when this CPU has no native bf16.
    from vllm.platforms import current_platform

    expected = cpu_dtype("auto", current_platform.is_cpu(), cpu_flags()) or "auto"
    assert prepare_args(parse("m")).dtype == expected


@pytest.mark.parametrize(
    "argv, words",
    [
        (["m", "--api-server-count", "2"], "one API server"),
        (["m", "-asc", "4"], "one API server"),
        (
            [
                "m",
                "--kv-transfer-config",
                '{"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}',
            ],
            "LMCacheConnectorV1",
        ),
        (["m", "--no-enable-prefix-caching"], "prefix cache"),
        (["m", "--data-parallel-size", "2"], "one engine core"),
        (["m", "--headless"], "no API server"),
        (["m", "--grpc"], "HTTP"),
    ],
)
def test_prepare_refuses(parse, argv, words):
    with pytest.raises(UsageError, match=words):
        prepare_args(parse(*argv))


def test_general_plugin_is_inert_unless_asked():
    # In a fresh interpreter: register() wraps nothing without --plugin on the
    # command line, nor in a child process (engine core, workers) that
    # inherited a command line with it; the main process asked is wrapped.
    code = """
import multiprocessing as mp, sys
from vllm.engine.arg_utils import EngineArgs
from vllm_stateful import serve_flag
original = EngineArgs.add_cli_args
sys.argv = ["vllm", "serve", "m"]
serve_flag.register()
print("plain", EngineArgs.add_cli_args is original)
sys.argv += ["--plugin", "stateful"]
def child(q):
    serve_flag.register()
    q.put(EngineArgs.add_cli_args is original)
ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start(); p.join()
print("child", q.get())
serve_flag.register()
print("asked", EngineArgs.add_cli_args is original)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    words = ("plain", "child", "asked")
    lines = [line for line in out.stdout.splitlines() if line.partition(" ")[0] in words]
    assert lines == ["plain True", "child True", "asked False"]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=server_env())


def test_vllm_command_reports_the_cpu_build():
    from vllm_stateful.vllm_command import vllm_version

    out = _run(vllm_command() + ["--version"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == vllm_version()


@pytest.mark.parametrize(
    "cmd, message",
    [
        (
            lambda: vllm_command() + ["serve", "m", "--plugin", "stateful", "-asc", "2"],
            "vllm serve: error: --api-server-count 2: sessions live in one API server process",
        ),
        (
            lambda: alias_command() + ["serve", "m", "-asc", "2"],
            "serve: error: --api-server-count 2: sessions live in one API server process",
        ),
        (
            lambda: vllm_command() + ["serve", "m", "--plugin", "nope"],
            "argument --plugin: invalid choice: 'nope'",
        ),
    ],
)
def test_commands_refuse_with_a_message(cmd, message):
    out = _run(cmd())
    assert out.returncode == 2, out.stderr[-3000:]
    assert message in out.stderr


# ----------------------------------------------------------- real servers


def test_literal_command_answers_from_the_session(server, http, open_session):
    """``server`` is ``vllm serve MODEL --plugin stateful`` (conftest)."""
    s = open_session("09:30:00 1651.25 3\n")
    r = http.post(
        f"/v1/sessions/{s.id}/append",
        params={"wait": "true"},
        json={"text": "09:30:01 1651.50 2\n"},
        headers=s.headers,
    )
    assert r.status_code == 200, r.text
    question = " Last price?"
    r = http.post(
        f"/v1/sessions/{s.id}/completions",
        json={"prompt": question, "max_tokens": 4, "temperature": 0},
        headers=s.headers,
    )
    assert r.status_code == 200, r.text
    # Everything but the question came from the session's pinned KV.
    assert r.json()["session"]["computed_tokens"] == len(tokenize(http, question, special=False))


@pytest.fixture(scope="module")
def stock(tiny_model_path: str) -> Iterator[tuple[str, str]]:
    """``vllm serve MODEL`` without ``--plugin``, vllm-stateful installed."""
    port = _free_port()
    with running(vllm_command() + tiny_serve_args(tiny_model_path, port), server_env(), port) as (
        base,
        log,
    ):
        yield base, log.read_text(errors="replace")


def test_without_the_flag_vllm_is_stock(stock, tiny_model_path):
    base, log = stock
    assert httpx.post(base + "/v1/sessions", json={}).status_code == 404
    r = httpx.post(
        base + "/v1/completions",
        json={"model": tiny_model_path, "prompt": "a b c", "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    # The plugin set nothing: vLLM echoes the non-default arguments, warns
    # that no VLLM_PLUGINS enables the endpoint plugin, and neither the
    # connector nor the scheduler was loaded.
    (echo,) = [line for line in log.splitlines() if "non-default args:" in line]
    for name in ("kv_transfer_config", "scheduler_cls", "enable_prefix_caching", "plugin"):
        assert f"'{name}'" not in echo, echo
    assert "Found endpoint plugin(s) ['stateful'] but VLLM_PLUGINS is not set" in log
    assert "StatefulConnector" not in log and "StatefulScheduler" not in log
