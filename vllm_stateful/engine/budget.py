"""Admission control for pinned session KV, in KV tokens.

A session pins whole blocks, so its cost is its token count rounded up to
the block size. Growth past the cap is refused up front (a typed error),
never resolved by evicting another session.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from vllm_stateful.errors import BudgetExceededError


@dataclass(frozen=True)
class Budget:
    limit_tokens: int
    block_size: int

    def cost(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size) * self.block_size

    def used(self, session_sizes: Iterable[int]) -> int:
        return sum(self.cost(n) for n in session_sizes)

    def check(self, used_by_others: int, new_size: int, session_id: str) -> None:
        need = self.cost(new_size)
        if used_by_others + need > self.limit_tokens:
            raise BudgetExceededError(
                f"session memory budget exceeded: session '{session_id}' would pin "
                f"{need} KV tokens, other sessions pin {used_by_others}, budget is "
                f"{self.limit_tokens} tokens (raise VLLM_STATEFUL_BUDGET_FRACTION or "
                f"close sessions)"
            )


def budget_limit(
    budget_tokens: int | None,
    budget_fraction: float,
    usable_blocks: int,
    block_size: int,
    max_model_len: int,
) -> int:
    """The session budget in KV tokens, checked against the KV cache.

    ``usable_blocks`` excludes vLLM's null block. With sessions pinning the
    whole budget, the rest must still hold one request of ``max_model_len``
    tokens, or such a request could never be scheduled: pinning would
    deadlock the engine. Raises ``ValueError`` naming the setting otherwise.
    """
    if budget_tokens is not None:
        setting, limit = f"VLLM_STATEFUL_BUDGET_TOKENS={budget_tokens}", budget_tokens
        if limit < 0:
            raise ValueError(f"{setting}: the session budget must not be negative")
    else:
        setting = f"VLLM_STATEFUL_BUDGET_FRACTION={budget_fraction}"
        limit = int(budget_fraction * usable_blocks) * block_size
    pinned_blocks = -(-limit // block_size)
    need = -(-max_model_len // block_size)
    if pinned_blocks + need > usable_blocks:
        raise ValueError(
            f"{setting} lets sessions pin {pinned_blocks} of the {usable_blocks} KV cache "
            f"blocks, leaving {usable_blocks - pinned_blocks}; one request of max_model_len "
            f"{max_model_len} tokens needs {need} blocks of {block_size}. Lower the budget "
            f"(at most {(usable_blocks - need) * block_size} tokens), lower --max-model-len, "
            f"or give the KV cache more memory"
        )
    return limit
