"""What sessions need from ``vllm serve``'s arguments, in one place.

Both ways of starting the server use this: ``vllm serve MODEL --plugin
stateful`` (``serve_flag.py`` applies it after vLLM parsed the command line)
and ``vllm-stateful serve MODEL`` (``cli.py``, an alias of the former).

It sets, unless the user already did:

* ``--kv-transfer-config``: the session connector;
* prefix caching on (sessions are served from the prefix cache);
* ``--scheduler-cls``: the session-aware scheduler (``config.scheduler_cls``);
* ``--dtype float32`` on CPUs without native bf16 (``cpu_dtype.py``);
* ``--speculative-config`` from ``VLLM_STATEFUL_SPECULATION``
  (``config.speculative_config``: vLLM's n-gram proposer with a batch-size
  schedule), when the setting is not ``off``; with the n-gram proposer,
  ``NUMBA_THREADING_LAYER=workqueue`` unless set (``numba_threads.py``);

and ``VLLM_PLUGINS`` names the ``stateful`` endpoint plugin (endpoint
plugins load only when named), keeping every plugin that was enabled;
``VLLM_HTTP_TIMEOUT_KEEP_ALIVE`` (how long the server keeps an idle
connection) is ``KEEP_ALIVE_S`` unless set.

It refuses what cannot work: another KV connector, prefix caching off, more
than one API server process, data-parallel engines (a session's state and
pinned KV live in one API process and one engine core), ``--headless`` and
``--grpc`` (no HTTP session API).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, MutableMapping

from vllm_stateful.config import connector_config, scheduler_cls, speculative_config

PLUGIN_NAME = "stateful"  # the entry point name of both of our vLLM plugins
GENERAL_PLUGINS_GROUP = "vllm.general_plugins"

# vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE
# seconds, 5 by default: exactly httpx's own idle expiry (the openai
# client's too), so a request could go out on a connection the server was
# closing and fail with a ReadError (it stopped a benchmark's feed once in
# ~2,000 appends). A feed pauses for seconds between appends; the server
# waits longer than clients keep idle connections.
KEEP_ALIVE_ENV = "VLLM_HTTP_TIMEOUT_KEEP_ALIVE"
KEEP_ALIVE_S = 30


class UsageError(Exception):
    """A flag combination sessions cannot run with; printed, exit status 2."""


def plugins_allowlist(current: str | None, installed_general: Iterable[str]) -> str:
    """The ``VLLM_PLUGINS`` value that also enables the session plugins.

    ``VLLM_PLUGINS`` unset means "every general plugin"; setting it to ours
    alone would silently disable the others, so they are listed too.
    """
    names = [n for n in (current.split(",") if current is not None else installed_general) if n]
    if PLUGIN_NAME not in names:
        names.append(PLUGIN_NAME)
    return ",".join(dict.fromkeys(names))


def enable_plugin(environ: MutableMapping[str, str]) -> None:
    """Name ``stateful`` in ``VLLM_PLUGINS`` and set the server's idle
    connection timeout (``KEEP_ALIVE_S``) unless given. In time for the
    endpoint plugin and the HTTP server as long as it runs before the API
    server builds its app; the engine core inherits the environment."""
    from importlib.metadata import entry_points

    installed = [ep.name for ep in entry_points(group=GENERAL_PLUGINS_GROUP)]
    environ["VLLM_PLUGINS"] = plugins_allowlist(environ.get("VLLM_PLUGINS"), installed)
    environ.setdefault(KEEP_ALIVE_ENV, str(KEEP_ALIVE_S))


def prepare_args(args: argparse.Namespace) -> argparse.Namespace:
    """Check and complete parsed ``vllm serve`` arguments for sessions."""
    from vllm.config.kv_transfer import KVTransferConfig

    from vllm_stateful.cpu_dtype import default_dtype
    from vllm_stateful.numba_threads import keep_engine_threads

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
            "and vLLM loads one connector per engine. Drop the flag: the plugin sets it."
        )
    if given is None:
        args.kv_transfer_config = KVTransferConfig(**ours)
    if args.enable_prefix_caching is False:
        raise UsageError(
            "--no-enable-prefix-caching: sessions are served from the prefix cache; drop the flag"
        )
    args.enable_prefix_caching = True
    if getattr(args, "scheduler_cls", None) is None:
        args.scheduler_cls = scheduler_cls()
    args.dtype = default_dtype(args.dtype)
    if getattr(args, "speculative_config", None) is None:
        # VLLM_STATEFUL_SPECULATION; the user's own --speculative-config wins.
        try:
            args.speculative_config = speculative_config()
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    keep_engine_threads(args.speculative_config)
    # vLLM would default the API server count to the data-parallel size.
    args.api_server_count = 1
    return args


def serve_parser(prog: str):
    """vLLM's own ``serve`` parser, standalone (for tests and benchmarks that
    parse arguments without starting a server)."""
    from vllm.entrypoints.cli.serve import DESCRIPTION
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog=prog, description=DESCRIPTION)
    return make_arg_parser(parser)
