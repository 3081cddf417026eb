"""``vllm serve MODEL --plugin stateful``: our ``vllm.general_plugins`` entry.

vLLM loads general plugins in every process (API server, engine core,
workers) and, when it builds a command-line parser, from
``AsyncEngineArgs.add_cli_args`` just before the engine flags are added. So
this plugin must do nothing unless asked: it acts only in a main process
whose command line has ``--plugin``; anywhere else loading it changes
nothing (no flag, no patch, no environment).

When asked it wraps two vLLM hooks, both looked up at call time:

* ``EngineArgs.add_cli_args``: the ``serve`` parser gets
  ``--plugin {stateful}`` (other subcommands' parsers do not, so the flag
  is refused there rather than ignored);
* ``ServeSubcommand.validate``, which ``vllm serve`` runs after parsing and
  before anything starts: with ``--plugin stateful`` the arguments are
  completed and checked by ``serve_args.prepare_args`` and ``VLLM_PLUGINS``
  names the endpoint plugin, in time for the API server to mount it.

Only stdlib imports at module level: this module is imported in every vLLM
process.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from collections.abc import Sequence

FLAG = "--plugin"
PLUGIN_NAME = "stateful"
_MARK = "_vllm_stateful_wrapped"


def asked(argv: Sequence[str]) -> bool:
    """Whether a command line passes ``--plugin`` (any value)."""
    return any(a == FLAG or a.startswith(FLAG + "=") for a in argv[1:])


def register() -> None:
    """The entry point vLLM calls, with no arguments, in every process."""
    # Spawned engine-core and worker processes inherit sys.argv: only the
    # process that parses the command line may act.
    if multiprocessing.parent_process() is not None or not asked(sys.argv):
        return
    _wrap_add_cli_args()


def is_serve_parser(parser: argparse.ArgumentParser) -> bool:
    # "vllm serve", "vllm-stateful serve"; not "vllm bench serve".
    return parser.prog.split()[1:] == ["serve"]


def add_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--plugin`` to a ``serve`` parser (idempotent)."""
    if FLAG in parser._option_string_actions:
        return
    parser.add_argument(
        FLAG,
        choices=[PLUGIN_NAME],
        default=None,
        action=_PluginAction,
        help="Serve with a plugin. 'stateful' (vllm-stateful) adds the session API "
        "(/v1/sessions) and sets the KV connector, prefix caching and scheduler it needs.",
    )


class _PluginAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _wrap_serve_validate(parser.prog)


def apply(args: argparse.Namespace, prog: str) -> None:
    """What ``--plugin stateful`` does to parsed ``serve`` arguments; a
    refusal exits with status 2, as argparse does."""
    from vllm_stateful.serve_args import UsageError, enable_plugin, prepare_args

    try:
        prepare_args(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    enable_plugin(os.environ)


def _wrap_add_cli_args() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.add_cli_args
    if getattr(original, _MARK, False):
        return

    def add_cli_args(parser, *a, **kw):
        parser = original(parser, *a, **kw)
        if is_serve_parser(parser):
            add_flag(parser)
        return parser

    setattr(add_cli_args, _MARK, True)
    EngineArgs.add_cli_args = staticmethod(add_cli_args)


def _wrap_serve_validate(prog: str) -> None:
    from vllm.entrypoints.cli.serve import ServeSubcommand

    original = ServeSubcommand.validate
    if getattr(original, _MARK, False):
        return

    def validate(self, args: argparse.Namespace) -> None:
        if getattr(args, "plugin", None) == PLUGIN_NAME:
            apply(args, prog)
        original(self, args)

    setattr(validate, _MARK, True)
    ServeSubcommand.validate = validate
