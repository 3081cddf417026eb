"""``vllm-stateful serve``: what it sets and what it refuses, without
starting a server."""

from __future__ import annotations

import subprocess

import pytest

from vllm_stateful.cli import UsageError, plugins_allowlist, prepare_args

from .conftest import serve_command


@pytest.fixture(scope="module")
def parse():
    from vllm_stateful.cli import _parser

    parser = _parser("vllm-stateful serve")
    return lambda *argv: parser.parse_args(list(argv))


def test_plugins_allowlist_keeps_what_the_user_enabled():
    assert plugins_allowlist(None, ["lora_a", "lora_b"]) == "lora_a,lora_b,stateful"
    assert plugins_allowlist("mine", ["lora_a"]) == "mine,stateful"
    assert plugins_allowlist("stateful,mine", []) == "stateful,mine"
    assert plugins_allowlist("", ["lora_a"]) == "stateful"  # "" enabled nothing


def test_prepare_sets_connector_prefix_caching_and_model(parse):
    args = prepare_args(parse("some/model", "--block-size", "32"))
    assert args.model == "some/model"
    assert args.kv_transfer_config.kv_connector == "StatefulConnector"
    assert args.kv_transfer_config.kv_connector_module_path == "vllm_stateful.kv.connector"
    assert args.kv_transfer_config.kv_role == "kv_both"
    assert args.enable_prefix_caching is True and args.api_server_count == 1
    same = '{"kv_connector": "StatefulConnector", "kv_connector_module_path": "vllm_stateful.kv.connector", "kv_role": "kv_both"}'
    assert (
        prepare_args(parse("m", "--kv-transfer-config", same)).kv_transfer_config.kv_connector
        == "StatefulConnector"
    )


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
    ],
)
def test_prepare_refuses(parse, argv, words):
    with pytest.raises(UsageError, match=words):
        prepare_args(parse(*argv))


def test_console_script_refuses_with_a_message():
    out = subprocess.run(
        serve_command() + ["serve", "m", "-asc", "2"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "sessions live in one API server process" in out.stderr
