"""Asynchronous client of the session API (``httpx.AsyncClient``); the same
calls as :mod:`vllm_stateful.client.sync`, awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from vllm_stateful.client import _wire
from vllm_stateful.client.sync import DEFAULT_TIMEOUT
from vllm_stateful.server.schemas import (
    AppendResponse,
    Completion,
    Consistency,
    CreateSessionResponse,
    FlashInfo,
    FlashList,
    SessionList,
    SessionStats,
)


class AsyncClient:
    """``async with AsyncClient("http://localhost:8000") as c: ...``"""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        http: httpx.AsyncClient | None = None,
    ):
        self._http = http or httpx.AsyncClient(
            base_url=base_url.rstrip("/"), headers=_wire.auth_headers(api_key), timeout=timeout,
            limits=_wire.connection_limits(),
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP connections (sessions stay open on the server)."""
        await self._http.aclose()

    async def _send(self, call: _wire.Call) -> Any:
        r = await self._http.request(
            call.method, call.path, json=call.json, params=call.params, headers=call.headers()
        )
        _wire.raise_for(r.status_code, r.content, r.headers.get("Retry-After"))
        return r.json()

    async def _stream(
        self, call: _wire.Call, read_timeout: float | None
    ) -> AsyncIterator[tuple[str, str]]:
        timeout = httpx.Timeout(self._http.timeout.connect or 10.0, read=read_timeout)
        async with self._http.stream(
            call.method, call.path, json=call.json, params=call.params,
            headers=call.headers(), timeout=timeout,
        ) as r:  # fmt: skip
            if r.status_code >= 400:
                _wire.raise_for(r.status_code, await r.aread(), r.headers.get("Retry-After"))
            parser = _wire.SSEParser()
            async for line in r.aiter_lines():
                if (msg := parser.feed(line)) is not None:
                    yield msg

    async def create_session(
        self,
        prefix: str | list[int] = "",
        session_id: str | None = None,
        ttl_s: float | None = None,
        flash: list[dict[str, Any]] | None = None,
        overflow: str | None = None,
        max_tokens: int | None = None,
    ) -> AsyncSession:
        """Open a session; returns once its prefix is ingested. ``overflow``
        ("reject" or "slide") and ``max_tokens``: see ``POST /v1/sessions``."""
        call = _wire.create_call(prefix, session_id, ttl_s, flash, overflow, max_tokens)
        out = await self._send(call)
        created = CreateSessionResponse.model_validate(out)
        return AsyncSession(self, created.id, created.token)

    def session(self, session_id: str, token: str) -> AsyncSession:
        """A handle on an existing session (no request is made)."""
        return AsyncSession(self, session_id, token)

    async def list_sessions(self, *tokens: str) -> list[SessionStats]:
        """Stats of the sessions that ``tokens`` open."""
        call = _wire.Call("GET", "/v1/sessions", token=",".join(tokens))
        return SessionList.model_validate(await self._send(call)).data


class AsyncSession:
    """One server-side session; every call sends its token."""

    def __init__(self, client: AsyncClient, session_id: str, token: str):
        self.client, self.id, self.token = client, session_id, token

    def __repr__(self) -> str:
        return f"AsyncSession(id={self.id!r})"

    async def append(self, data: str | list[int], wait: bool = False) -> int:
        """Append text or token ids; returns the new version."""
        out = await self.client._send(_wire.append_call(self.id, self.token, data, wait))
        return AppendResponse.model_validate(out).version

    async def query(
        self,
        prompt: str | list[int],
        max_tokens: int | None = None,
        temperature: float | None = None,
        consistency: Consistency = "ingested",
        commit: bool = False,
        max_staleness_ms: float | None = None,
        **sampling: Any,
    ) -> Completion:
        """Answer ``prompt`` after the session's context."""
        call = _wire.query_call(
            self.id, self.token, prompt, stream=False, max_tokens=max_tokens,
            temperature=temperature, consistency=consistency, commit=commit, sampling=sampling,
            max_staleness_ms=max_staleness_ms,
        )  # fmt: skip
        return Completion.model_validate(await self.client._send(call))

    async def stream(
        self,
        prompt: str | list[int],
        max_tokens: int | None = None,
        temperature: float | None = None,
        consistency: Consistency = "ingested",
        max_staleness_ms: float | None = None,
        **sampling: Any,
    ) -> AsyncIterator[str]:
        """Text deltas of the answer as they are generated."""
        call = _wire.query_call(
            self.id, self.token, prompt, stream=True, max_tokens=max_tokens,
            temperature=temperature, consistency=consistency, commit=False, sampling=sampling,
            max_staleness_ms=max_staleness_ms,
        )  # fmt: skip
        async for _, data in self.client._stream(call, read_timeout=None):
            delta = _wire.completion_delta(data)
            if delta is None:
                return
            if delta:
                yield delta

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Session events as dicts, until the session is closed or evicted."""
        call = _wire.Call("GET", f"/v1/sessions/{self.id}/events", token=self.token)
        async for _, data in self.client._stream(call, read_timeout=None):
            event = _wire.event_dict(data)
            yield event
            if event["type"] in _wire.FINAL_EVENTS:
                return

    async def stats(self) -> SessionStats:
        call = _wire.Call("GET", f"/v1/sessions/{self.id}", token=self.token)
        return SessionStats.model_validate(await self.client._send(call))

    async def close(self) -> None:
        """Close the session on the server and free its KV."""
        await self.client._send(_wire.Call("DELETE", f"/v1/sessions/{self.id}", token=self.token))

    async def register_flash(self, prompt: str | list[int], **fields: Any) -> FlashInfo:
        """Register a flash query (``max_tokens``, ``temperature`` (default
        0), ``seed``, ``id``, ``only_changed``, other sampling fields). A
        query with the same prompt and fields is answered from its cache."""
        call = _wire.flash_call(self.id, self.token, {"prompt": prompt, **fields})
        return FlashInfo.model_validate(await self.client._send(call))

    async def list_flash(self) -> list[FlashInfo]:
        """Registered flash queries with their newest cached answers."""
        call = _wire.Call("GET", f"/v1/sessions/{self.id}/flash", token=self.token)
        return FlashList.model_validate(await self.client._send(call)).data

    async def drop_flash(self, flash_id: str) -> None:
        call = _wire.Call("DELETE", f"/v1/sessions/{self.id}/flash/{flash_id}", token=self.token)
        await self.client._send(call)
