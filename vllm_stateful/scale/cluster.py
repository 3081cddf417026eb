"""Start-up: a Ray cluster to run on, Serve's HTTP proxy, the application.

With ``RAY_ADDRESS`` set, the command joins that cluster. Without it, it
starts a local one bound to the loopback address: Ray binds its services
(GCS, raylet, object manager, per-node helpers) to the machine's private-network
address by default, which would expose them on the network; here every
service listens on 127.0.0.1 (see ``loopback.py``), and so does
Serve's HTTP proxy unless ``--host`` says otherwise. The dashboard is off, and so are Ray's usage reports.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
from dataclasses import dataclass

from vllm.logger import init_logger

from vllm_stateful.scale.config import LOOPBACK, ScaleConfig, ScaleUsageError, from_cli
from vllm_stateful.scale.loopback import single_machine

logger = init_logger(f"vllm.{__name__}")


@dataclass(frozen=True)
class Cluster:
    address: str | None  # RAY_ADDRESS joined; None: a local cluster we started

    @property
    def local(self) -> bool:
        return self.address is None


def start_ray(config: ScaleConfig, address: str | None = None) -> Cluster:
    """Join ``address`` (default: ``RAY_ADDRESS``) or, when it is empty or
    unset, start a local cluster on the loopback address with room for
    every replica."""
    import ray

    # No usage reports to Ray's servers, from the driver or the cluster.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if address is None:
        address = os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=False)
        return Cluster(address)
    single_machine()
    # Ray runs its workers at niceness 15 by default, behind every other
    # process on the machine; a replica is the server itself, not
    # background work (an operator's own setting wins).
    os.environ.setdefault("RAY_worker_niceness", "0")
    # Room for every replica even past the core count (they then share
    # cores; see replica.core_binding).
    cpus = max(os.cpu_count() or 1, math.ceil(config.replicas * config.replica_cpus))
    ray.init(
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        num_cpus=cpus,
        log_to_driver=False,
    )
    return Cluster(None)


def deploy(config: ScaleConfig, blocking: bool = False) -> str:
    """Start Serve's HTTP proxy on ``config.host:port`` and run the
    application; returns its base URL once every replica is up."""
    from ray import serve

    from vllm_stateful.scale.app import application

    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(
        application(config), name=config.app_name, route_prefix=config.route_prefix,
        blocking=blocking,
    )  # fmt: skip
    return f"http://{config.host}:{config.port}"


def shutdown(cluster: Cluster, config: ScaleConfig) -> None:
    """Remove the application; a local cluster is stopped altogether."""
    import ray
    from ray import serve

    try:
        if cluster.local:
            serve.shutdown()
        else:
            serve.delete(config.app_name)
    finally:
        ray.shutdown()


def check_args(config: ScaleConfig) -> None:
    """Refuse bad vLLM flags here, before any replica tries them (a replica
    that cannot start would be restarted over and over)."""
    from vllm_stateful.serve_args import UsageError, prepare_args, serve_parser

    try:
        prepare_args(serve_parser("vllm-stateful serve").parse_args(config.replica_argv))
    except UsageError as exc:
        raise ScaleUsageError(str(exc)) from None


def main(argv: list[str]) -> int:
    """``vllm-stateful serve MODEL --replicas N [...]``: serve until Ctrl-C
    or SIGTERM."""
    try:
        config = from_cli(argv)
        check_args(config)
    except ScaleUsageError as exc:
        print(f"vllm-stateful serve: error: {exc}", file=sys.stderr)
        return 2
    cluster = start_ray(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        url = deploy(config)
        logger.info(
            "vllm-stateful: %d replica(s) of %s serving on %s (Ray: %s)",
            config.replicas, config.model, url, cluster.address or "local cluster on 127.0.0.1",
        )  # fmt: skip
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        shutdown(cluster, config)
    return 0
