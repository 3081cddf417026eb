"""The Ray Serve application: N session replicas behind Serve's HTTP proxy,
placed by the session router.

``build_app`` is an application builder, the form ``serve run`` and
``serve deploy`` config files take::

    serve run vllm_stateful.scale:build_app model=MODEL replicas=2 \\
        vllm_args="--dtype float32 --max-model-len 4096"

``application(config)`` is the same from Python (``vllm-stateful serve
--replicas`` uses it).
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.deployment import Application

from vllm_stateful.scale.config import ScaleConfig
from vllm_stateful.scale.replica import SessionReplica

DEPLOYMENT_NAME = "SessionReplica"
ROUTER_CLASS = "vllm_stateful.scale.router.SessionRouter"


def application(config: ScaleConfig) -> Application:
    """The bound application for ``serve.run``."""
    deployment = serve.deployment(
        SessionReplica,
        name=DEPLOYMENT_NAME,
        num_replicas=config.replicas,
        max_ongoing_requests=config.max_ongoing_requests,
        # vLLM starts slowly (model load, warm-up): Serve's defaults would
        # restart a replica that is still loading.
        health_check_period_s=10,
        health_check_timeout_s=60,
        graceful_shutdown_timeout_s=30,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS,
            request_routing_stats_period_s=config.stats_period_s,
            request_routing_stats_timeout_s=max(10.0, 5 * config.stats_period_s),
        ),
        ray_actor_options={
            "num_cpus": config.replica_cpus,
            "runtime_env": {"env_vars": config.env},
        },
    )
    return deployment.bind(config.replica_argv, config.replica_cpus)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for ``serve run`` / ``serve deploy``: ``model``
    (required), ``replicas``, ``replica_cpus``, ``vllm_args``,
    ``stats_period_s``, ``max_ongoing_requests``."""
    return application(ScaleConfig.from_builder_args(args))
