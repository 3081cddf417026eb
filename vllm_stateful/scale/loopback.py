"""Keeping a local Ray cluster on the loopback address, in one place.

Two Ray 2.60 behaviours would otherwise open ports on the network:

* a node address of 127.0.0.1 is turned into the machine's reachable
  address (``services.resolve_ip_for_localhost``) unless multi-node
  clusters are disabled, which ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` does
  on any platform; with the node address 127.0.0.1 every Ray server binds
  to it alone (``single_machine``, in the process that starts the cluster);
* every Serve replica starts a gRPC server for calls between deployments
  on ``[::]:0``, all interfaces, whatever the node address
  (``ray/serve/_private/replica.py``); on a loopback node it is bound to
  127.0.0.1 instead, which is where the other processes of the node reach
  it (``replica_grpc_on_loopback``, in the replica, before Serve starts
  that server).
"""

from __future__ import annotations

import os

from vllm.logger import init_logger

logger = init_logger(f"vllm.{__name__}")

LOOPBACK = "127.0.0.1"
_MARK = "_vllm_stateful_loopback"


def single_machine() -> None:
    """Before ``ray.init`` starts a local cluster: keep it on 127.0.0.1. The
    environment reaches the processes ``ray.init`` starts; the attribute,
    this process (``ray_constants`` reads the variable once, at import)."""
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def replica_grpc_on_loopback() -> None:
    """In a replica on a loopback node: bind Serve's inter-deployment gRPC
    server to 127.0.0.1 rather than all interfaces. Nothing changes on a
    node with a network address. If Ray moved the hook, say so and go on
    (the port then stays open on every interface, as in stock Ray)."""
    import ray
    from ray.serve._private import replica as serve_replica

    if ray.util.get_node_ip_address() != LOOPBACK:
        return
    original = getattr(serve_replica, "add_port_to_grpc_server", None)
    if original is None:
        logger.warning("vllm-stateful: Ray Serve's replica gRPC hook moved; its port "
                       "stays open on every interface")  # fmt: skip
        return
    if getattr(original, _MARK, False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = f"{LOOPBACK}:{address.rsplit(':', 1)[1]}"
        return original(server, address)

    setattr(add_port, _MARK, True)
    serve_replica.add_port_to_grpc_server = add_port
