"""The ``vllm.endpoint_plugins`` entry point: mounts the session API.

vLLM loads it in the API server process when ``VLLM_PLUGINS`` names
``stateful`` (``vllm serve MODEL --plugin stateful`` sets that).
``attach_router`` adds the routes, replacing ``POST /v1/completions`` and ``POST /v1/chat/completions``
with versions that keep the stock routes for requests without
``session_id``; ``init_state`` wraps vLLM's engine client in a
``StatefulEngine``.
"""

from __future__ import annotations

from argparse import Namespace
from typing import Any

from fastapi import FastAPI
from starlette.datastructures import State
from vllm.logger import init_logger

from vllm_stateful.config import StatefulConfig
from vllm_stateful.server.delegate import find_route
from vllm_stateful.store import SessionStore, default_store_path
from vllm_stateful.server.state import DEFAULT_KEEPALIVE_S, ServerState

# Under "vllm." so vLLM's logging configuration shows it.
logger = init_logger(f"vllm.{__name__}")

PLUGIN_NAME = "stateful"
# Stock routes that the plugin takes over and delegates to.
_WRAPPED = ("/v1/completions", "/v1/chat/completions")


class StatefulEndpointPlugin:
    """Session routes on vLLM's OpenAI-compatible server."""

    name = PLUGIN_NAME
    # Sessions generate text: never on a pooling-only or render-only server.
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        from vllm_stateful.server.admin_routes import router as admin_router
        from vllm_stateful.server.routes import router

        # Keep the stock routes before vLLM replaces them with ours.
        app.state.stateful_stock_routes = {
            path: route for path in _WRAPPED if (route := find_route(app, path, "POST"))
        }
        app.include_router(router)
        app.include_router(admin_router)

    async def init_state(self, engine_client: Any, state: State, args: Namespace) -> None:
        from vllm.renderers.chat_utils import load_chat_template

        from vllm_stateful.engine import StatefulEngine

        if engine_client is None:  # render-only server: excluded by required_tasks
            return
        kv = engine_client.vllm_config.kv_transfer_config
        if kv is None or kv.kv_connector != "StatefulConnector":
            # Fail at startup rather than serve routes that cannot work.
            raise RuntimeError(
                "the 'stateful' endpoint plugin needs the session KV connector: start "
                "the server with `vllm serve MODEL --plugin stateful ...`, or pass "
                '--kv-transfer-config \'{"kv_connector": "StatefulConnector", '
                '"kv_connector_module_path": "vllm_stateful.kv.connector", '
                '"kv_role": "kv_both"}\''
            )
        names = list(args.served_model_name or [args.model])
        config = StatefulConfig.from_env()
        engine = StatefulEngine(engine_client, config, store=open_store(config, names[0], args))
        restored = await engine.restore()
        keepalive = float(getattr(args, "sse_keep_alive_interval", 0) or 0) or DEFAULT_KEEPALIVE_S
        state.stateful = ServerState(
            engine=engine,
            model_names=names,
            model_config=engine_client.model_config,
            chat_template=load_chat_template(args.chat_template),
            model_defaults=engine_client.model_config.get_diff_sampling_param(),
            keepalive_s=keepalive,
        )
        logger.info(
            "vllm-stateful: session API ready (block size %d, %d blocks, budget %d KV tokens)",
            engine.block_size,
            engine.num_blocks,
            engine.budget.limit_tokens,
        )
        store = engine.journal.store
        logger.info(
            "vllm-stateful: session store %s (sync %s): restoring %d sessions, %d expired "
            "while down, %d refused",
            store.path if store else "off", config.store_sync, len(restored.restoring),
            len(restored.expired), len(restored.refused),
        )  # fmt: skip
        for session_id, why in restored.refused.items():
            logger.error("vllm-stateful: stored session '%s' not restored: %s", session_id, why)


def open_store(config: StatefulConfig, model: str, args: Namespace) -> SessionStore | None:
    """The server's session store: ``VLLM_STATEFUL_STORE`` names the file
    (``off``: none); by default one file for this model and port under the
    user's state directory (``store/location.py``)."""
    if config.store == "off":
        return None
    path = config.store or default_store_path(model, int(args.port))
    return SessionStore(path, config.store_sync, model=args.model)


def plugin() -> StatefulEndpointPlugin:
    """Entry point factory (zero arguments, as vLLM calls it)."""
    return StatefulEndpointPlugin()
