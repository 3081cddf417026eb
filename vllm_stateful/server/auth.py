"""Session tokens: who may touch a session.

Every session route needs the session's own access token in the
``X-Session-Token`` header, in addition to vLLM's ``--api-key`` (enforced by
vLLM's middleware on every ``/v1`` path, these routes included). A token
opens exactly one session: it is compared only with the named session's.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.requests import Request

from vllm_stateful.engine.session import token_hash
from vllm_stateful.errors import AccessDeniedError, SessionNotFoundError
from vllm_stateful.server.errors import UnauthorizedError
from vllm_stateful.server.schemas import TOKEN_HEADER

if TYPE_CHECKING:
    from vllm_stateful.engine import StatefulEngine
    from vllm_stateful.engine.session import Session


def presented_tokens(request: Request) -> list[str]:
    """Tokens in ``X-Session-Token``; several may be given comma-separated
    (``GET /v1/sessions`` lists the sessions they open)."""
    raw = request.headers.get(TOKEN_HEADER, "")
    return [t.strip() for t in raw.split(",") if t.strip()]


def opens(session: Session, tokens: list[str]) -> bool:
    # Compared by hash: a session restored from the store has only that.
    # compare_digest for every token: the time taken does not reveal which
    # prefix matched.
    want = session.token_hash.encode()
    return any(hmac.compare_digest(token_hash(t).encode(), want) for t in tokens)


def require_tokens(request: Request) -> list[str]:
    tokens = presented_tokens(request)
    if not tokens:
        raise UnauthorizedError(
            f"missing {TOKEN_HEADER} header: session routes need the token "
            "returned when the session was created"
        )
    return tokens


def authorize(engine: StatefulEngine, session_id: str, request: Request) -> Session:
    """The session named ``session_id`` if the request carries its token.

    401 without a token, 404 for an unknown session, 403 for a token that
    does not open this session.
    """
    tokens = require_tokens(request)
    session = engine.sessions.get(session_id)
    if session is None:
        raise SessionNotFoundError(f"session '{session_id}' not found")
    if not opens(session, tokens):
        raise AccessDeniedError(f"the {TOKEN_HEADER} given does not open session '{session_id}'")
    return session
