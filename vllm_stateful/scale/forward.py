"""One HTTP request handed from a replica to the replica that holds its
session, through Ray Serve (a deployment-handle call keyed by the session
id, so Ray's router picks the owner), and answered there by the same ASGI
app as a direct request.

The owner runs the request against its app in-process and yields the ASGI
messages the app sends; the first replica sends them on to its client
unchanged, so status, headers and streamed chunks arrive as they left.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Scope


@dataclass(frozen=True)
class ForwardedRequest:
    """What an owner needs to replay a request: plain data (it crosses
    processes)."""

    method: str
    path: str
    query_string: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: str = "1.1"

    @classmethod
    def of(cls, scope: Scope, body: bytes) -> ForwardedRequest:
        return cls(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=list(scope.get("headers", [])),
            body=body,
            http_version=scope.get("http_version", "1.1"),
        )

    def scope(self) -> Scope:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": self.query_string,
            "root_path": "",
            "headers": self.headers,
            "client": None,
            "server": None,
            "state": {},
        }


# How long an app may run on after its response is complete.
_AFTER_RESPONSE_S = 5.0


def _done(message: Message) -> bool:
    return message["type"] == "http.response.body" and not message.get("more_body", False)


async def replay(app: ASGIApp, request: ForwardedRequest) -> AsyncIterator[Message]:
    """Run ``request`` against ``app`` here; yield the messages it sends.

    The body is delivered once; after that ``receive`` waits, as a
    connected client's would: a disconnect is a cancellation of this
    generator (the caller's client went away), which cancels the app.
    """
    out: asyncio.Queue[Message | BaseException] = asyncio.Queue()
    delivered = False
    finished = asyncio.Event()

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        await out.put(message)

    async def run() -> None:
        try:
            await app(request.scope(), receive, send)
        except BaseException as exc:  # handed to the consumer
            await out.put(exc)

    task = asyncio.create_task(run())
    complete = False
    try:
        while True:
            message = await out.get()
            if isinstance(message, BaseException):
                raise message
            yield message
            if _done(message):
                complete = True
                return
    finally:
        finished.set()
        if complete:
            # The response is out; let the app finish what follows it
            # (background tasks), within reason.
            await asyncio.wait({task}, timeout=_AFTER_RESPONSE_S)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
