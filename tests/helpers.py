"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

from vllm import SamplingParams
from vllm.inputs import TokensPrompt


def greedy(max_tokens: int = 8) -> SamplingParams:
    # ignore_eos: both sides always produce max_tokens, so whole sequences
    # are compared, not just their common prefix.
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


async def generate(llm, prompt_ids: list[int], params: SamplingParams):
    """One request on a plain AsyncLLM; returns the final RequestOutput."""
    final = None
    async for out in llm.generate(
        TokensPrompt(prompt_token_ids=prompt_ids), params.clone(), f"ref-{uuid.uuid4().hex}"
    ):
        final = out
    return final


async def reference(llm, prompt_ids: list[int], max_tokens: int = 8) -> list[int]:
    out = await generate(llm, prompt_ids, greedy(max_tokens))
    return list(out.outputs[0].token_ids)


async def until(predicate, timeout: float = 60.0) -> None:
    """Wait for ``predicate()`` to hold, polling the event loop; fail after
    ``timeout`` seconds. For positive conditions only: a negative check
    after a wait proves nothing."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.002)


class RpcFaults:
    """Stands in for ``engine.rpc.generate`` (install it with
    ``monkeypatch.setattr(engine.rpc, "generate", faults.generate)``): every
    request still runs on the real engine, but requests of ``hold_op`` wait
    at a gate (``arrived`` is set when one does; ``gate.set()`` lets them
    through) and requests for which ``fail(key, prompt, op)`` is true raise.
    Reaches states such as "an ingestion is in flight" without sleeps."""

    def __init__(self, engine):
        self.original = engine.rpc.generate
        self.fail = lambda key, prompt, op: False
        self.hold_op = None
        self.arrived = asyncio.Event()
        self.gate = asyncio.Event()
        self.calls: list[tuple[str, object]] = []  # (session key, op) per request
        # Per request: the session tokens of an append a flash question rides.
        self.data_tokens: list[int | None] = []

    def generate(self, key, prompt_ids, params, op, since=None, data_tokens=None):
        self.calls.append((key, op))
        self.data_tokens.append(data_tokens)
        return self._generate(key, prompt_ids, params, op, since, data_tokens)

    async def _generate(self, key, prompt_ids, params, op, since, data_tokens):
        if self.fail(key, prompt_ids, op):
            raise RuntimeError(f"injected failure of {op.value}")
        if op is self.hold_op:
            self.arrived.set()
            await self.gate.wait()
        original = self.original(key, prompt_ids, params, op, since, data_tokens)
        async with contextlib.aclosing(original) as outs:
            async for out in outs:
                yield out


@contextlib.asynccontextmanager
async def session_api(engine, **config):
    """A second ``StatefulEngine`` over the shared vLLM engine, with its own
    ``StatefulConfig(**config)``. On the way out its store (if any) is closed
    first, so what it holds stays there as after a crash; then its sessions
    are closed, freeing their pins, and the metrics read the shared engine
    again. Asserts that no pin is left."""
    from vllm_stateful import StatefulConfig, StatefulEngine, metrics

    other = StatefulEngine(engine.engine, StatefulConfig(**config))
    try:
        yield other
    finally:
        if other.journal.store is not None:
            other.journal.store.close()
            other.journal.store = None
        for sid in list(other.sessions):
            await other.close_session(sid)
        other.registry.stop()
        other.flash.scheduler.stop()
        metrics.bind(engine)
    assert (await engine.kv_stats()).pinned_blocks == 0
