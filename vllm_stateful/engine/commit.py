"""Questions that commit: question and answer are appended at the version
the answer saw, or nothing is (``CommitConflictError``).

The session may move in two places: before the question runs (an append not
yet ingested, which an answer reading the ingested version would not see)
and while it runs (an append arriving meanwhile).
"""

from __future__ import annotations

from vllm_stateful.engine.session import Session
from vllm_stateful.errors import CommitConflictError


def check_before(session: Session) -> None:
    """Before answering with ``consistency="ingested"``: the answer will
    see the ingested version, so every append must be ingested."""
    if session.ingested_version == session.version:
        return
    raise CommitConflictError(
        f"commit refused: session '{session.id}' is at version {session.version} but "
        f"only version {session.ingested_version} is ingested, so the answer would "
        f"not see the newest appends; ask with consistency='latest' (or wait for "
        f"ingestion) to commit"
    )


def check_after(session: Session, seen: int) -> None:
    """After answering: nothing was appended since the version it saw."""
    if session.version != seen:
        raise CommitConflictError(
            f"commit refused: the answer saw version {seen} of session '{session.id}', "
            f"which has moved on to version {session.version}; nothing was appended"
        )
