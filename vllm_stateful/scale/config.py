"""Settings of a scaled-out session server, in one object.

``vllm-stateful serve MODEL --replicas N [vllm serve flags]`` and the
application builder (``serve run vllm_stateful.scale:build_app ...``) both
end up here. The vLLM flags are kept as a command line: each replica parses
them with vLLM's own ``serve`` parser, exactly as ``vllm serve`` would.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

LOOPBACK = "127.0.0.1"
DEFAULT_PORT = 8000
# vLLM and session settings a replica must see as the driver does; on a
# remote cluster the driver's environment does not reach the replicas, so
# these travel in the deployment's runtime environment.
FORWARDED_ENV_PREFIXES = ("VLLM_", "HF_", "TRANSFORMERS_", "OMP_")
FORWARDED_ENV = ("DO_NOT_TRACK",)


class ScaleUsageError(Exception):
    """Bad scale-out settings; printed, exit status 2."""


@dataclass
class ScaleConfig:
    model: str
    # vLLM serve flags after the model (as typed); --host/--port are taken
    # out: they are the Serve HTTP proxy's.
    vllm_args: list[str] = field(default_factory=list)
    replicas: int = 1
    # Ray CPUs each replica reserves (its API process and engine core);
    # it also decides how many cores the replica's engine binds to.
    replica_cpus: float = 1.0
    host: str = LOOPBACK
    port: int = DEFAULT_PORT
    app_name: str = "vllm-stateful"
    route_prefix: str = "/"
    # How often replicas report their free session budget to the routers.
    stats_period_s: float = 1.0
    # Requests a replica takes at once (streams and forwarded requests
    # included); vLLM batches them.
    max_ongoing_requests: int = 256
    env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ScaleUsageError(f"--replicas {self.replicas}: at least one replica")
        if self.replica_cpus <= 0:
            raise ScaleUsageError(f"--replica-cpus {self.replica_cpus}: must be positive")

    @property
    def replica_argv(self) -> list[str]:
        """The ``vllm serve`` command line each replica parses."""
        return [self.model, *self.vllm_args]

    @classmethod
    def from_builder_args(cls, args: Mapping[str, Any]) -> ScaleConfig:
        """From ``serve run module:build_app key=value ...`` or a config
        file's ``args``: ``model``, ``replicas``, ``replica_cpus``,
        ``vllm_args`` (a list, or one string split like a shell would)."""
        known = {"model", "replicas", "replica_cpus", "vllm_args", "stats_period_s",
                 "max_ongoing_requests"}  # fmt: skip
        unknown = sorted(set(args) - known)
        if unknown:
            raise ScaleUsageError(f"unknown application args {unknown}; known: {sorted(known)}")
        if "model" not in args:
            raise ScaleUsageError("the application needs model=MODEL")
        extra = args.get("vllm_args") or []
        return cls(
            model=str(args["model"]),
            vllm_args=shlex.split(extra) if isinstance(extra, str) else [str(a) for a in extra],
            replicas=int(args.get("replicas", 1)),
            replica_cpus=float(args.get("replica_cpus", 1.0)),
            stats_period_s=float(args.get("stats_period_s", 1.0)),
            max_ongoing_requests=int(args.get("max_ongoing_requests", 256)),
            env=forwarded_env(os.environ),
        )


def forwarded_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The driver's settings that replicas need (see FORWARDED_ENV_PREFIXES)."""
    return {
        k: v for k, v in environ.items()
        if k.startswith(FORWARDED_ENV_PREFIXES) or k in FORWARDED_ENV
    }  # fmt: skip


# Our flags, taken out of a `vllm-stateful serve` command line; the rest
# are vLLM's. --host/--port name the Serve HTTP proxy's address.
_OURS = {"--replicas": "replicas", "--replica-cpus": "replica_cpus", "--host": "host",
         "--port": "port"}  # fmt: skip
# Set by the scale-out command itself (each replica is a session server).
_DROPPED = {"--plugin": 1}


def from_cli(argv: list[str]) -> ScaleConfig:
    """``MODEL [--replicas N] [--replica-cpus C] [--host H] [--port P]
    [vllm serve flags]`` (the words after ``vllm-stateful serve``)."""
    found: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _OURS or name in _DROPPED:
            if not eq:
                if i + 1 >= len(argv):
                    raise ScaleUsageError(f"{name} needs a value")
                value = argv[i + 1]
                i += 1
            if name in _OURS:
                found[_OURS[name]] = value
        else:
            rest.append(arg)
        i += 1
    model, vllm_args = _model_of(rest)
    try:
        return ScaleConfig(
            model=model,
            vllm_args=vllm_args,
            replicas=int(found.get("replicas", 1)),
            replica_cpus=float(found.get("replica_cpus", 1.0)),
            host=found.get("host", LOOPBACK),
            port=int(found.get("port", DEFAULT_PORT)),
            env=forwarded_env(os.environ),
        )
    except ValueError as exc:
        raise ScaleUsageError(str(exc)) from None


def _model_of(args: list[str]) -> tuple[str, list[str]]:
    if args and not args[0].startswith("-"):
        return args[0], args[1:]
    for i, arg in enumerate(args):
        if arg == "--model" and i + 1 < len(args):
            return args[i + 1], args[:i] + args[i + 2 :]
        if arg.startswith("--model="):
            return arg.split("=", 1)[1], args[:i] + args[i + 1 :]
    raise ScaleUsageError("no model: vllm-stateful serve MODEL --replicas N [vllm serve flags]")
