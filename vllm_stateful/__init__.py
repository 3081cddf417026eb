"""vllm-stateful: stateful streaming sessions for vLLM."""

from vllm_stateful.config import StatefulConfig
from vllm_stateful.errors import (
    AccessDeniedError,
    BacklogFullError,
    BudgetExceededError,
    CommitConflictError,
    ContextLengthError,
    EngineDeadError,
    IngestionFailedError,
    InvalidInputError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
    SessionRestoringError,
    StatefulError,
    StoreWriteError,
    TenantLimitError,
)

__all__ = [
    "AccessDeniedError",
    "BacklogFullError",
    "BudgetExceededError",
    "CommitConflictError",
    "ContextLengthError",
    "EngineDeadError",
    "IngestionFailedError",
    "InvalidInputError",
    "QueryResult",
    "SessionClosedError",
    "SessionExistsError",
    "SessionNotFoundError",
    "SessionRestoringError",
    "StatefulConfig",
    "StatefulEngine",
    "StatefulError",
    "StoreWriteError",
    "TenantLimitError",
    "stateful_engine_args",
]


def __getattr__(name: str):
    # The engine imports vLLM; keep `import vllm_stateful` light for the
    # client and for vLLM's plugin loader, which imports it in every process.
    if name in ("StatefulEngine", "QueryResult", "stateful_engine_args"):
        from vllm_stateful import engine

        return getattr(engine, name)
    raise AttributeError(name)
