"""Hand a request on to the stock vLLM route that a plugin route replaced.

``/v1/completions`` and ``/v1/chat/completions`` are replaced so that a body
with ``session_id`` is answered from a session. Every other body must reach
vLLM's own handler unchanged: the plugin keeps the original route object and
runs it as an ASGI app, replaying the body it already read.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send


def find_route(app: FastAPI, path: str, method: str) -> APIRoute | None:
    """The route currently serving ``method path`` (call before replacing it)."""
    for route in app.routes:
        if isinstance(route, APIRoute) and route.path == path and method in route.methods:
            return route
    return None


class Delegate(Response):
    """A response that runs ``route`` on the original request.

    The body has been consumed already; the first ``receive`` replays it,
    later ones pass through, so the stock handler still sees disconnects.
    """

    def __init__(self, route: APIRoute, body: bytes):
        super().__init__()
        self.route = route
        self.body_bytes = body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": self.body_bytes, "more_body": False}
            return await receive()

        await self.route.handle(scope, replay, send)


async def delegate(route: APIRoute, request: Request) -> Delegate:
    return Delegate(route, await request.body())
