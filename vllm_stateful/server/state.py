"""What the routes need at request time, built once in ``init_state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

from vllm_stateful.server.errors import SessionsUnavailableError

if TYPE_CHECKING:
    from vllm_stateful.engine import StatefulEngine

# Seconds between SSE keep-alive comments on the events stream when vLLM's
# --sse-keep-alive-interval is not set.
DEFAULT_KEEPALIVE_S = 15.0


@dataclass
class ServerState:
    engine: StatefulEngine
    model_names: list[str]  # served names; the first is reported by default
    model_config: Any  # vllm.config.ModelConfig (for the chat template)
    chat_template: str | None  # --chat-template, resolved; None: the tokenizer's
    model_defaults: dict[str, Any]  # sampling defaults from generation_config
    keepalive_s: float = DEFAULT_KEEPALIVE_S
    # Set when this server is one replica of several (vllm_stateful.scale):
    # reported in session stats, and new session ids name it so that a
    # router can send each later request of the session back here.
    replica: str | None = None

    def new_session_id(self) -> str | None:
        """An id for a session created without one; None: the engine's own."""
        if self.replica is None:
            return None
        from vllm_stateful.scale.session_keys import mint

        return mint(self.replica)


def server_state(request: Request) -> ServerState:
    st = getattr(request.app.state, "stateful", None)
    if st is None:
        raise SessionsUnavailableError("sessions are not initialised on this server")
    return st
