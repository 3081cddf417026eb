"""Scheduler side of offload: which sessions' KV is out of the pool, and what
the worker copies out, loads back or drops in each step.

The connector (``connector.py``) calls it from vLLM's scheduler hooks; the
worker side (``offload.py``) runs the step's saves, loads and drops, in
that order, before the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm_stateful.kv.offload import stored_tokens
from vllm_stateful.kv.pins import same_until

if TYPE_CHECKING:
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.request import Request

    from vllm_stateful.kv.pins import PinTable

# (session key, block ids, their token ids) to copy out of the pool;
# (key, block indices in the copy, block ids) to load back.
Save = tuple[str, list[int], list[int]]
Load = tuple[str, list[int], list[int]]


@dataclass
class StepTransfers:
    """What the worker runs in one step (sent in the connector's metadata)."""

    saves: list[Save] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    drops: list[str] = field(default_factory=list)  # copies no longer needed


@dataclass
class OffloadPlan:
    block_size: int
    # Offloaded sessions: key -> the token ids their copy holds.
    copies: dict[str, list[int]] = field(default_factory=dict)
    # Keys whose disk has no copy from an earlier run: looked up once, not on
    # every scheduling attempt (later copies are this engine's own, in
    # ``copies``). Forgotten on close.
    _no_stored_copy: set[str] = field(default_factory=set)
    _planned: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # req -> (key, n, block)
    _saving: dict[str, tuple[str, list[int]]] = field(default_factory=dict)  # req -> (key, tokens)
    step: StepTransfers = field(default_factory=StepTransfers)

    def take_step(self) -> StepTransfers:
        step, self.step = self.step, StepTransfers()
        return step

    def closed(self, key: str) -> None:
        self.copies.pop(key, None)
        self._no_stored_copy.discard(key)
        self.step.drops.append(key)

    def save(self, request_id: str, key: str, block_ids: list[int], tokens: list[int]) -> None:
        """An offload request: the worker copies the pinned blocks out in this
        step. The pin is released only when the request finishes
        (``saved``): until then no other request can be given these blocks
        and write over them. Once per request (allocation may be retried)."""
        if request_id in self._saving:
            return
        self.step.saves.append((key, list(block_ids), list(tokens)))
        self._saving[request_id] = (key, list(tokens))

    def saved(self, request_id: str, pins: PinTable) -> None:
        """The worker has copied the pin out: release it, unless a newer
        version was pinned meanwhile (then the copy is stale: drop it)."""
        saving = self._saving.pop(request_id, None)
        if saving is None:
            return
        key, tokens = saving
        pin = pins.pins.get(key)
        if pin is not None and pin.token_ids == tokens:
            self.copies[key] = tokens
            pins.release(key)
        else:
            self.step.drops.append(key)

    def supplies(self, key: str, pinned_tokens: int | None) -> bool:
        """Whether the copy, not the pin, supplies a request's KV: the session
        is out of the pool, or coming back in chunks (a restore after a
        restart) and the copy holds more than the pin."""
        copy = self.copies.get(key)
        return pinned_tokens is None or (copy is not None and len(copy) > pinned_tokens)

    def plan_load(self, request: Request, key: str, computed: int) -> int:
        """Tokens past the prefix-cache hit that the session's copy can
        supply: as far as the prompt equals the copy's tokens (KV is valid
        only for an identical prefix), leaving one token to compute."""
        self._planned.pop(request.request_id, None)
        tokens = self.copies.get(key)
        if tokens is None and key not in self._no_stored_copy:
            tokens = stored_tokens(key)  # written by an earlier run of the engine
            if tokens is None:
                self._no_stored_copy.add(key)
            else:
                self.copies[key] = tokens
        if tokens is None or computed % self.block_size:
            return 0
        prompt = request.prompt_token_ids
        same = same_until(prompt, tokens, 0, min(len(tokens), len(prompt) - 1))
        if same <= computed:
            return 0
        n = same - computed
        self._planned[request.request_id] = (key, n, computed // self.block_size)
        return n

    def allocated(self, request_id: str, blocks: KVCacheBlocks, external: int) -> int:
        """The request got its blocks: load the planned tokens into them.
        Returns the tokens loaded (0 when nothing was planned)."""
        plan = self._planned.pop(request_id, None)
        if plan is None or not external:
            return 0
        key, n, first = plan
        assert n == external, (n, external)
        last = (first * self.block_size + n - 1) // self.block_size
        dst = blocks.get_block_ids()[0][first : last + 1]
        self.step.loads.append((key, list(range(first, last + 1)), list(dst)))
        return n

    def pinned(self, key: str, tokens: int) -> None:
        """A version of ``tokens`` tokens was pinned: a copy it covers is no
        longer needed."""
        copy = self.copies.get(key)
        if copy is not None and tokens >= len(copy):
            del self.copies[key]
            self.step.drops.append(key)

    def forget(self, request_id: str) -> None:
        self._planned.pop(request_id, None)
