"""Session affinity for what the router cannot see: ids in request bodies.

Ray's router places a request before its body arrives, so it keys only on
the path (``/v1/sessions/{id}/...``) and on Ray Serve's session header
(``x-session-id``). Three bodies can name a session without either:
``/v1/completions`` and ``/v1/chat/completions`` with ``session_id`` (the
OpenAI client's ``extra_body``), and a create with a client-chosen
``session_id`` (which must land where the hash ring will look for it).

This ASGI middleware, outermost on every replica, reads those bodies. When
the named session is not here (or, for a create, may belong elsewhere) it
hands the request to ``forward``: a call through Ray Serve keyed by the
session id, which Ray's router (``router.py``) delivers to the owner. Every
other request passes straight through. The cost is one more hop inside Ray
for such requests only; a client that sends ``x-session-id`` avoids it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vllm_stateful.scale.forward import ForwardedRequest
from vllm_stateful.scale.session_keys import BODY_KEYED_PATHS, SESSIONS_PATH

Forward = Callable[[str, ForwardedRequest], AsyncIterator[Message]]


def session_header_name() -> bytes:
    """Ray Serve's session header (``RAY_SERVE_SESSION_ID_HEADER_KEY``), as
    ASGI carries header names: lower-case bytes."""
    from ray.serve._private.constants import SERVE_SESSION_ID

    return SERVE_SESSION_ID.lower().encode()


def body_session_id(body: bytes) -> str | None:
    """``session_id`` of a JSON object body, if it is a non-empty string
    (anything else is for the route handler to refuse)."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    sid = obj.get("session_id") if isinstance(obj, dict) else None
    return sid if isinstance(sid, str) and sid else None


class SessionAffinity:
    """Sends body-keyed session requests to the replica that holds the
    session; ``holds(id)`` says whether this replica does."""

    def __init__(self, app: ASGIApp, holds: Callable[[str], bool], forward: Forward):
        self.app = app
        self.holds = holds
        self.forward = forward
        self.header = session_header_name()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self._body_keyed(scope):
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        sid = body_session_id(body)
        creates = scope["path"].rstrip("/") == SESSIONS_PATH
        # A create with a client-chosen id always goes to the ring's owner:
        # this replica cannot tell whether it is that owner.
        if sid is None or (not creates and self.holds(sid)):
            await self.app(scope, _replaying(body, receive), send)
            return
        async for message in self.forward(sid, ForwardedRequest.of(scope, body)):
            await send(message)

    def _body_keyed(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST":
            return False
        if scope["path"].rstrip("/") not in BODY_KEYED_PATHS:
            return False
        # Keyed by the header: the router already placed it by this key.
        return not any(name == self.header for name, _ in scope.get("headers", []))


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replaying(body: bytes, receive: Receive) -> Receive:
    """``receive`` that gives the body read already, then passes through (so
    the app still hears a disconnect)."""
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
