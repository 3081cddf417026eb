"""Scheduler-side table of pinned session KV.

A pin is one reference (``BlockPool.touch``) on each block of a session's
last ingested version, taken before the finishing append request frees its
own references, so the blocks survive in the prefix cache and are never
evicted. Full blocks are then found by vLLM's ordinary prefix-cache lookup;
the last, partial block is not hashed, so the connector copies it (see
``connector.py``) and must know its tokens: a pin keeps the token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from vllm.v1.core.block_pool import BlockPool


def same_until(prompt: list[int], tokens: list[int], start: int, limit: int) -> int:
    """The first position from ``start`` (before ``limit``) where ``prompt``
    and ``tokens`` differ, or ``limit``: how far stored KV is valid for the
    prompt (KV is only valid for an identical prefix)."""
    i = start
    while i < limit and prompt[i] == tokens[i]:
        i += 1
    return i


@dataclass
class Pin:
    block_ids: list[int]
    token_ids: list[int]


class PinTable:
    def __init__(self, block_pool: BlockPool, block_size: int):
        self.pool = block_pool
        self.block_size = block_size
        self.pins: dict[str, Pin] = {}

    @property
    def pinned_blocks(self) -> int:
        return sum(len(p.block_ids) for p in self.pins.values())

    def replace(self, session: str, block_ids: list[int], token_ids: list[int]) -> None:
        """Pin ``block_ids`` (holding ``token_ids``) and release the old pin.

        Touch first: the new version shares the old version's full blocks,
        and releasing first could drop them to ref 0 for a moment.
        """
        n_blocks = -(-len(token_ids) // self.block_size)
        assert len(block_ids) >= n_blocks, (len(block_ids), n_blocks)
        block_ids = block_ids[:n_blocks]
        self.pool.touch([self.pool.blocks[i] for i in block_ids])
        self.release(session)
        self.pins[session] = Pin(block_ids=block_ids, token_ids=list(token_ids))

    def release(self, session: str) -> None:
        pin = self.pins.pop(session, None)
        if pin is not None:
            # Reverse order: the tail is the least useful to keep cached, so
            # it goes to the front of the eviction queue.
            self.pool.free_blocks(self.pool.blocks[i] for i in reversed(pin.block_ids))

    def match_tail(self, session: str, prompt: list[int], computed: int) -> tuple[int, int]:
        """How many prompt tokens past ``computed`` the pin can supply.

        ``computed`` is the block-aligned prefix-cache hit. Returns
        ``(num_tokens, src_block_id)``. The whole prefix is compared with the
        pin's tokens, not just the tail: a prefix-cache hit may end inside an
        earlier query's question, and KV is only valid for identical
        prefixes. So a stale or foreign pin can never feed wrong KV.
        At least one prompt token is always left to compute: the scheduler
        needs a token to run.
        """
        pin = self.pins.get(session)
        if pin is None or computed % self.block_size:
            return 0, -1
        idx = computed // self.block_size
        if idx >= len(pin.block_ids):
            return 0, -1
        if prompt[:computed] != pin.token_ids[:computed]:
            return 0, -1
        limit = min(len(pin.token_ids), computed + self.block_size, len(prompt) - 1)
        n = same_until(prompt, pin.token_ids, computed, limit) - computed
        return n, pin.block_ids[idx]
