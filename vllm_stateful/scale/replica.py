"""One replica of the session server: vLLM's own OpenAI app, with the
session endpoint plugin and an engine set up as ``vllm serve MODEL --plugin
stateful`` sets it up, running inside a Ray Serve replica.

Ray Serve's HTTP proxy hands it the requests its router chose for it (as
ASGI); no socket of its own is opened. Besides the app it offers Serve:

* ``record_routing_stats``: its free session budget, for the router to
  place new sessions;
* ``forward``: a request another replica received for a session held here
  (``affinity.py``), answered by the same app;
* ``check_health``: fails once the engine is dead, so Serve replaces the
  replica (its sessions are lost with it; see docs/scaling.md).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

from ray import serve
from starlette.types import ASGIApp, Message
from vllm.logger import init_logger

from vllm_stateful.scale.affinity import SessionAffinity
from vllm_stateful.scale.forward import ForwardedRequest, replay
from vllm_stateful.scale.loopback import replica_grpc_on_loopback
from vllm_stateful.scale.router import BLOCK_SIZE, FREE_TOKENS, SEQ, SESSIONS

logger = init_logger(f"vllm.{__name__}")


def core_binding(local_rank: int, cpus_per_replica: float, cores: list[int]) -> str | None:
    """The cores this replica's engine binds to (``VLLM_CPU_OMP_THREADS_BIND``):
    its own slice of the machine's cores by its rank on the node, so that
    replicas sharing a machine do not spin on the same cores. None when
    the slice does not fit (vLLM's ``auto`` binding then applies)."""
    per = int(cpus_per_replica)
    start = local_rank * per
    if per < 1 or start + per > len(cores):
        return None
    return ",".join(str(c) for c in cores[start : start + per])


@serve.ingress()
class SessionReplica:
    """A Ray Serve ingress deployment; the app is built at replica start
    (``__serve_build_asgi_app__``), after the engine."""

    async def __init__(self, replica_argv: list[str], replica_cpus: float) -> None:
        from vllm_stateful.serve_args import enable_plugin, prepare_args, serve_parser

        # Before Serve starts this replica's gRPC server (after __init__).
        replica_grpc_on_loopback()
        ctx = serve.get_replica_context()
        self.tag = ctx.replica_id.unique_id
        self._deployment, self._app_name = ctx.deployment, ctx.app_name
        if "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            cores = sorted(os.sched_getaffinity(0))
            bind = core_binding(ctx.rank.local_rank, replica_cpus, cores)
            if bind is not None:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        # A replica's sessions die with it (a new replica gets a new id, and
        # minted session ids name the old one): a store file per server
        # would only collide between replicas sharing a machine and port.
        os.environ.setdefault("VLLM_STATEFUL_STORE", "off")
        # What `vllm serve MODEL ... --plugin stateful` does with its flags;
        # VLLM_PLUGINS must name the endpoint plugin before the app is built.
        self.args = prepare_args(serve_parser("vllm-stateful serve").parse_args(replica_argv))
        enable_plugin(os.environ)
        self._stack = AsyncExitStack()
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

        self.engine_client = await self._stack.enter_async_context(
            build_async_engine_client(self.args)
        )
        self._seq = 0
        self._inner: ASGIApp | None = None
        logger.info("vllm-stateful: replica %s engine ready", self.tag)

    async def __serve_build_asgi_app__(self) -> ASGIApp:
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.app import build_app

        tasks = await self.engine_client.get_supported_tasks()
        app = build_app(self.args, tasks, self.engine_client.model_config)
        await init_app_state(self.engine_client, app.state, self.args, tasks)
        # Stats report the replica, and new sessions get ids that name it.
        app.state.stateful.replica = self.tag
        self._state = app.state.stateful
        self._inner = app
        outer = SessionAffinity(app, self._holds, self._forward)
        # Serve's wrapper reads ``docs_url`` etc. from a FastAPI app only.
        return outer

    # ------------------------------------------------------------ for Serve

    async def record_routing_stats(self) -> dict[str, Any]:
        """Free session budget, for new sessions to go where there is room."""
        engine = self._state.engine
        budgeted = list(engine.registry.budgeted())
        pinned = engine.budget.used(len(s.tokens) for s in budgeted)
        self._seq += 1
        return {
            FREE_TOKENS: engine.budget.limit_tokens - pinned,
            SESSIONS: len(budgeted),
            "pinned_tokens": pinned,
            BLOCK_SIZE: engine.block_size,
            SEQ: self._seq,
        }

    async def check_health(self) -> None:
        if self.engine_client.errored:
            raise RuntimeError(f"replica {self.tag}: the vLLM engine is dead")

    async def forward(self, request: ForwardedRequest) -> AsyncIterator[Message]:
        """A request that reached another replica first; answered here."""
        assert self._inner is not None
        async for message in replay(self._inner, request):
            yield message

    # ------------------------------------------------------------ internals

    def _holds(self, session_id: str) -> bool:
        return session_id in self._state.engine.sessions

    async def _forward(self, session_id: str, request: ForwardedRequest) -> AsyncIterator[Message]:
        handle = serve.get_deployment_handle(self._deployment, self._app_name)
        stream = handle.options(method_name="forward", stream=True, session_id=session_id)
        response = stream.remote(request)
        try:
            async for message in response:
                yield message
        finally:
            response.cancel()

    async def __del__(self) -> None:
        await self._stack.aclose()
