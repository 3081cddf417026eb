"""Which session a request belongs to, from what each hop can see.

Shared by the request router (which sees the path and headers, not the
body) and the replica's affinity middleware (which sees the body too).

A session id minted by a replica names it: ``{replica}.{random}``, where
``replica`` is the Ray Serve replica's unique id. The router sends every
request of such a session to that replica while it lives. Ids that clients
choose carry no replica and are placed by consistent hashing instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

SESSIONS_PATH = "/v1/sessions"
# Routes whose JSON body may name a session (``session_id``): vLLM's own
# OpenAI routes, and the create route (a client-chosen id).
BODY_KEYED_PATHS = ("/v1/completions", "/v1/chat/completions", SESSIONS_PATH)
SEPARATOR = "."


def mint(replica: str) -> str:
    """A new session id that routes back to ``replica``."""
    return f"{replica}{SEPARATOR}{uuid.uuid4().hex}"


def replica_of(session_id: str) -> str | None:
    """The replica named by a minted id; None for any other id (also for a
    client-chosen id that happens to contain the separator: the router only
    trusts the prefix when a live replica has that id)."""
    head, sep, tail = session_id.partition(SEPARATOR)
    return head if sep and head and tail else None


@dataclass(frozen=True)
class RequestKey:
    """What routing needs to know about one HTTP request."""

    session_id: str | None  # the session it addresses, when visible
    creates: bool  # POST /v1/sessions (a new session: placed by free budget)


def key_of(method: str, path: str, session_header: str | None = None) -> RequestKey:
    """The routing key of ``method path`` (no body).

    ``/v1/sessions/{id}`` and everything under it address session ``id``;
    ``session_header`` (Ray Serve's session header, ``x-session-id``) wins
    when given, so a client can key any request, a create included.
    """
    if session_header:
        return RequestKey(session_header, False)
    path = path.rstrip("/") or "/"
    if path == SESSIONS_PATH:
        return RequestKey(None, method.upper() == "POST")
    prefix = SESSIONS_PATH + "/"
    if path.startswith(prefix):
        sid = path[len(prefix) :].split("/", 1)[0]
        return RequestKey(sid or None, False)
    return RequestKey(None, False)
