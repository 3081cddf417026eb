"""``vllm_stateful.client``: the same session through the sync and async
clients; server errors come back as the typed exceptions."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_stateful.client import (
    AccessDeniedError,
    ApiKeyError,
    AsyncClient,
    Client,
    ContextLengthError,
    InvalidInputError,
    SessionExistsError,
    SessionNotFoundError,
)

from .conftest import MAX_MODEL_LEN, Server


def test_sync_client(server: Server):
    with Client(server.base_url, api_key=server.api_key) as client:
        s = client.create_session("09:30:00 1651.25 3\n", session_id="client-sync")
        try:
            assert s.append("09:30:01 1651.50 2\n", wait=True) == 1
            assert s.append([5, 6, 7]) == 2
            answer = s.query(
                " last?", max_tokens=6, temperature=0, ignore_eos=True, consistency="latest"
            )
            assert answer.session.version == 2 and answer.usage.completion_tokens == 6
            assert (
                "".join(s.stream(" last?", max_tokens=6, temperature=0, ignore_eos=True))
                == answer.text
            )
            stats = s.stats()
            assert (stats.version, stats.ingested_version, stats.pending) == (2, 2, 0)
            assert [x.id for x in client.list_sessions(s.token)] == ["client-sync"]

            with pytest.raises(SessionExistsError, match="client-sync"):
                client.create_session("again", session_id="client-sync")
            with pytest.raises(ContextLengthError, match="max_model_len"):
                s.append([5] * MAX_MODEL_LEN)
            with pytest.raises(InvalidInputError, match="top_p"):
                s.query("x", top_p=3)  # refused before sending
            with pytest.raises(InvalidInputError, match="unknown field"):
                s.query("x", nonsense=1)
            with pytest.raises(AccessDeniedError) as denied:
                client.session(s.id, "not-the-token").stats()
            assert denied.value.http_status == 403
        finally:
            s.close()
        with pytest.raises(SessionNotFoundError):
            s.stats()
    with Client(server.base_url, api_key="wrong") as bad, pytest.raises(ApiKeyError):
        bad.create_session("x")


async def test_async_client(server: Server):
    async with AsyncClient(server.base_url, api_key=server.api_key) as client:
        s = await client.create_session([0, 5, 6, 7, 8])
        try:
            assert await s.append("hello", wait=True) == 1
            answer = await s.query([9, 10], max_tokens=5, temperature=0, ignore_eos=True)
            assert (
                answer.session.computed_tokens == 2
                and answer.usage.prompt_tokens_details.cached_tokens > 0
            )
            deltas = [
                d async for d in s.stream([9, 10], max_tokens=5, temperature=0, ignore_eos=True)
            ]
            assert "".join(deltas) == answer.text
            committed = await s.query([9], max_tokens=3, temperature=0, commit=True)
            assert committed.session.committed_version == 2
            assert (await s.stats()).version == 2
        finally:
            await s.close()


def test_client_imports_without_vllm():
    code = (
        "import sys\n"
        "for m in ('vllm', 'fastapi', 'starlette', 'torch'): sys.modules[m] = None\n"
        "from vllm_stateful.client import Client, AsyncClient\n"
        "from vllm_stateful.server import schemas, errors\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
