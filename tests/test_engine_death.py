"""When vLLM's engine core dies, every session call fails at once with a
typed error, waiters are woken, subscribers hear the end, and vLLM's own
health check (what ``/health`` answers from) reports it.

Uses its own small engine: its engine-core process is killed.
"""

from __future__ import annotations

import asyncio
import os
import signal

import psutil
import pytest
from vllm.v1.engine.exceptions import EngineDeadError as VllmEngineDeadError

from conftest import BLOCK_SIZE
from helpers import greedy, until
from vllm_stateful import StatefulConfig, StatefulEngine, stateful_engine_args
from vllm_stateful.errors import EngineDeadError

pytestmark = pytest.mark.asyncio(loop_scope="session")

FAST_S = 10.0  # "fails fast": far below any engine timeout


async def test_engine_death_fails_every_call_fast(tiny_model_path):
    engine = StatefulEngine.from_engine_args(
        stateful_engine_args(
            model=tiny_model_path, dtype="float32", enforce_eager=True, max_model_len=1024,
            block_size=BLOCK_SIZE, num_gpu_blocks_override=96,
        ),
        StatefulConfig(budget_tokens=1024),
    )  # fmt: skip
    core = psutil.Process(engine.engine.engine_core.resources.engine_manager.processes[0].pid)
    spawned = core.children(recursive=True)
    try:
        session = await engine.create_session([5] * 40)
        events = engine.subscribe(session.id)
        version = await engine.append(session.id, [6] * 600)
        waiter = asyncio.ensure_future(engine.wait_ingested(session.id, version))

        os.kill(core.pid, signal.SIGKILL)
        await until(lambda: not engine.rpc.alive, timeout=30)

        with pytest.raises(EngineDeadError) as info:
            await asyncio.wait_for(waiter, FAST_S)
        assert (info.value.http_status, info.value.code) == (503, "engine_dead")
        calls = [
            engine.create_session([1, 2, 3]),
            engine.append(session.id, [7]),
            engine.wait_ingested(session.id),
            engine.query(session.id, [8, 9], greedy(2)),
            engine.register_flash(session.id, [8, 9], greedy(2)),
            engine.close_session(session.id),
            engine.kv_stats(),
            engine.reconcile(),
        ]
        for call in calls:
            with pytest.raises(EngineDeadError):
                await asyncio.wait_for(call, FAST_S)
        with pytest.raises(EngineDeadError):
            engine.query_stream(session.id, [8, 9], greedy(2))
        # vLLM's /health calls check_health and answers 503 on this error.
        with pytest.raises(VllmEngineDeadError):
            await asyncio.wait_for(engine.engine.check_health(), FAST_S)
        # Subscribers hear that the session ended, and why.
        event = await asyncio.wait_for(events.get(), FAST_S)
        while event.type == "ingested":
            event = await asyncio.wait_for(events.get(), FAST_S)
        assert (event.type, event.data) == ("evicted", {"reason": "engine_dead"})
        assert not engine.sessions
    finally:
        engine.shutdown()
        for proc in spawned:  # the dead core's workers, started by this test
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
