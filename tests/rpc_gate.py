"""A test-only stand-in for the engine's ``EngineRPC`` (our own object, not
vLLM): every call still goes to the real engine, but requests of one
operation can be recorded, held back per session, or made to fail once.
It makes "a backlog exists", "an evaluation is behind" and "an ingest
request failed" states that tests reach deterministically, without sleeps.
"""

from __future__ import annotations

import asyncio
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from vllm_stateful.protocol import Op


@dataclass(frozen=True)
class Call:
    key: str
    prompt_tokens: int
    computed: int  # prompt tokens vLLM computed: prompt - num_cached_tokens
    seen: Any  # what ``probe`` returned when the request was sent


class InjectedFailure(RuntimeError):
    pass


class RPCGate:
    def __init__(self, rpc: Any, op: Op, probe: Callable[[], Any] | None = None):
        self._rpc = rpc
        self.op = op
        self.probe = probe or (lambda: None)
        self.calls: list[Call] = []
        self._held: dict[str, asyncio.Event] = {}
        self._arrived: dict[str, asyncio.Event] = {}
        self._fail_after: dict[str, int] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._rpc, name)

    def hold(self, key: str) -> None:
        """Hold this session's next requests (of ``op``) until released."""
        self._held[key] = asyncio.Event()
        self._arrived[key] = asyncio.Event()

    def release(self, key: str) -> None:
        self._held.pop(key).set()

    async def arrived(self, key: str) -> None:
        """Wait until a request of a held session is waiting at the gate."""
        await asyncio.wait_for(self._arrived[key].wait(), 60)

    def fail(self, key: str, after: int = 0) -> None:
        """Let ``after`` requests of this session through, fail the next one."""
        self._fail_after[key] = after

    def calls_of(self, key: str) -> list[Call]:
        return [c for c in self.calls if c.key == key]

    async def final(
        self, key: str, prompt_ids: list[int], params: Any, op: Op, since: float | None = None
    ) -> Any:
        if op is not self.op:
            return await self._rpc.final(key, prompt_ids, params, op, since)
        seen = self.probe()
        if key in self._held:
            self._arrived[key].set()
            await self._held[key].wait()
        if key in self._fail_after:
            if self._fail_after[key] == 0:
                del self._fail_after[key]
                raise InjectedFailure(f"injected failure of an {op.value} request")
            self._fail_after[key] -= 1
        out = await self._rpc.final(key, prompt_ids, params, op, since)
        computed = len(prompt_ids) - (out.num_cached_tokens or 0)
        self.calls.append(Call(key, len(prompt_ids), computed, seen))
        return out


@contextmanager
def gate(owner: Any, op: Op, probe: Callable[[], Any] | None = None) -> Iterator[RPCGate]:
    """Put a gate on ``owner.rpc`` (the engine's ``ingestor`` or ``flash``)
    for the duration; releases whatever is still held on the way out."""
    original = owner.rpc
    g = RPCGate(original, op, probe)
    owner.rpc = g
    try:
        yield g
    finally:
        owner.rpc = original
        for key in list(g._held):
            g.release(key)
