"""Typed errors of the session API.

Every error leaves the session it names intact. ``http_status`` and ``code``
give the HTTP mapping (OpenAI error format) the server uses.
"""

from __future__ import annotations


class StatefulError(Exception):
    """Base class of every error this package raises on bad input."""

    http_status = 400
    code = "invalid_request"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class InvalidInputError(StatefulError):
    """Empty or malformed input: empty text, bad token ids, bad parameters."""


class SessionNotFoundError(StatefulError):
    http_status = 404
    code = "session_not_found"


class SessionClosedError(StatefulError):
    """The session existed but was closed, expired or evicted."""

    http_status = 404
    code = "session_closed"


class SessionExistsError(StatefulError):
    http_status = 409
    code = "session_exists"


class ContextLengthError(StatefulError):
    """The session plus the new input would not fit in ``max_model_len``."""

    http_status = 413
    code = "context_length_exceeded"


class AppendTooLargeError(InvalidInputError):
    """One append that no context window of the session could ever hold
    (with ``overflow="slide"``: the prefix plus this append pass the
    session's token limit). The message names the limit; nothing was
    appended."""

    code = "append_too_large"


class BudgetExceededError(StatefulError):
    """Pinning the session's KV would pass the session memory budget."""

    http_status = 429
    code = "session_budget_exceeded"


class TenantLimitError(StatefulError):
    """The tenant's cap on open sessions or on pinned KV tokens
    (``tenant_max_sessions``, ``tenant_max_tokens``) would be passed. The
    message names the cap and its value; other tenants are not affected."""

    http_status = 429
    code = "tenant_limit_exceeded"


class AccessDeniedError(StatefulError):
    http_status = 403
    code = "forbidden"


class RetryLaterError(StatefulError):
    """An error the same request may succeed after: retry after
    ``retry_after_s`` seconds (HTTP: the ``Retry-After`` header)."""

    def __init__(self, message: str, retry_after_s: float = 1.0):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BacklogFullError(RetryLaterError):
    """The session's (or the server's) appended-but-not-ingested tokens
    would pass their bound. Nothing was appended; retry after
    ``retry_after_s`` seconds (estimated from the measured ingest rate)."""

    http_status = 429
    code = "ingest_backlog_full"


class SlideInProgressError(RetryLaterError):
    """With ``overflow="slide"``: the session's next window is still being
    built and this append would overflow it too. Nothing was appended; retry
    after ``retry_after_s`` seconds (the window is then in place)."""

    http_status = 429
    code = "slide_in_progress"


class IngestionFailedError(RetryLaterError):
    """The engine request that ingests the session failed. The session and
    everything appended are kept; the next append (or
    ``StatefulEngine.retry_ingest``) retries."""

    http_status = 503
    code = "ingestion_failed"


class CommitConflictError(StatefulError):
    """``commit`` refused: the session moved past the version the answer saw,
    so appending question and answer would put them after data the answer
    never read. Nothing was appended."""

    http_status = 409
    code = "commit_conflict"


class EngineDeadError(StatefulError):
    """vLLM's engine core is gone: every session call fails at once.
    Unrecoverable; restart the server (sessions do not survive it)."""

    http_status = 503
    code = "engine_dead"


class SessionRestoringError(RetryLaterError):
    """The session is being restored after a restart (its KV is rebuilt in
    the background) and the question asked not to wait
    (``consistency="available"``). Retry after ``retry_after_s`` seconds, or
    ask with ``consistency="ingested"`` to wait."""

    http_status = 503
    code = "session_restoring"


class StoreWriteError(StatefulError):
    """The durable session log could not record an append. The append is in
    the session (it is being ingested and answers see it) but it would not
    survive a restart; the store's error is in the server log."""

    http_status = 503
    code = "store_write_failed"
