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
