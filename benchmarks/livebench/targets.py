"""How each engine is fed and asked over HTTP, as its users would do it.

* :class:`StatefulTarget`: vllm-stateful sessions. Appends are token ids
  (202, ingested in the background); a 429 with ``Retry-After`` is honoured
  and counted; questions send only their own tokens (``consistency``
  "ingested", the default: answer from what is ingested, never wait); one
  question per session is registered as a flash query.
* :class:`StockTarget`: stock vLLM. There are no sessions: the client keeps
  each stream's tokens and every question sends the whole context + question
  to ``/v1/completions``. "Appending" is client-side only.

Fields of the live-stream contract (stats ``backlog_tokens``, events'
``lag_s``, ``max_staleness_ms``, ``session.staleness_ms``) are used when the
server has them; when it does not, the run says so in its notes and goes on.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

TOKEN_HEADER = "X-Session-Token"
SERVED_NAME = "bench"


class NeedRotation(Exception):
    """The session cannot take more (its KV budget or the context window)."""


class Notes:
    """What the server lacked and how the run worked around it (once each)."""

    def __init__(self) -> None:
        self.items: dict[str, str] = {}

    def add(self, key: str, text: str) -> None:
        if key not in self.items:
            self.items[key] = text
            print(f"note: {text}", flush=True)


@dataclass
class Ack:
    slot: int
    generation: int
    version: int
    tokens: int
    t_sched: float  # planned time of the first append in this request
    t_ack: float  # response received (level clock)
    retries: int = 0  # 429s before it was taken
    retry_wait_s: float = 0.0


@dataclass
class Handle:
    """One stream's current session (a slot rotates to a new session when
    its context reaches the window)."""

    slot: int
    generation: int
    prefix_tokens: int
    context: list[int]  # prefix + every acknowledged append
    lines: list[tuple[int, ...]]  # the lines in ``context`` (for the next window)
    session_id: str | None = None
    token: str | None = None
    version: int = 0
    acked_tokens: int = 0
    tokens_at: dict[int, int] = field(default_factory=dict)  # version -> context tokens
    acks: list[Ack] = field(default_factory=list)
    ingested: list[tuple[int, float, dict]] = field(default_factory=list)  # (version, t, data)
    flash_events: list[tuple[int, float, dict]] = field(default_factory=list)
    listener: asyncio.Task | None = None
    inflight: int = 0
    closed: bool = False

    @property
    def headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: self.token} if self.token else {}

    def ingested_version(self) -> int:
        return self.ingested[-1][0] if self.ingested else 0


@dataclass
class Asked:
    slot: int
    generation: int
    qid: str
    t_sched: float
    t_start: float
    e2e_s: float | None
    context: int | None  # tokens the answer attended to before the question
    acked_context: int  # tokens acknowledged on the stream when it was asked
    version: int | None = None
    acked_version: int | None = None
    flash: bool | None = None
    staleness_ms: float | None = None
    computed_tokens: int | None = None
    text: str | None = None
    error: str | None = None


class Clock:
    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def reset(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.t0


async def sse_lines(r: httpx.Response):
    event, data = "message", []
    async for line in r.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


def _err(r: httpx.Response, what: str) -> RuntimeError:
    return RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:400]}")


def _code(r: httpx.Response) -> str | None:
    try:
        return (r.json().get("error") or {}).get("code")
    except (ValueError, AttributeError):
        return None


def retry_after_s(r: httpx.Response, default: float = 1.0) -> float:
    try:
        return max(0.0, float(r.headers.get("retry-after", default)))
    except ValueError:
        return default


class Target:
    kind = "base"
    label = "base"

    def __init__(self, http: httpx.AsyncClient, clock: Clock, notes: Notes, sampling: dict):
        self.http, self.clock, self.notes, self.sampling = http, clock, notes, sampling

    async def open(self, slot: int, generation: int, prefix: list[int],
                   lines: list[tuple[int, ...]], flash: dict | None) -> Handle:  # fmt: skip
        h = Handle(slot, generation, len(prefix), list(prefix), list(lines))
        h.tokens_at[0] = len(prefix)
        return h

    def _acked(self, h: Handle, ids: list[int], lines, version: int, t_sched: float,
               retries: int, waited: float) -> Ack:  # fmt: skip
        h.context += ids
        h.lines += lines
        h.version = version
        h.acked_tokens += len(ids)
        h.tokens_at[version] = len(h.context)
        ack = Ack(h.slot, h.generation, version, len(ids), t_sched, self.clock(), retries, waited)
        h.acks.append(ack)
        return ack

    async def append(self, h: Handle, ids: list[int], lines, t_sched: float,
                     deadline: float | None) -> Ack | None:  # fmt: skip
        raise NotImplementedError

    async def wait_ingested(self, h: Handle, timeout: float) -> bool:
        return True

    async def ask(self, h: Handle, q: Any, flash_ask: bool) -> dict[str, Any]:
        raise NotImplementedError

    async def stats(self, h: Handle) -> dict[str, Any] | None:
        return None

    async def close(self, h: Handle) -> None:
        h.closed = True

    async def warm_up(self, ids: list[int]) -> None:
        body = {"model": SERVED_NAME, "prompt": ids, "max_tokens": 1, "temperature": 0}
        r = await self.http.post("/v1/completions", json=body)
        if r.status_code >= 400:
            raise _err(r, "warm-up completion")


class StockTarget(Target):
    kind = "stock"
    label = "vLLM, prefix caching on"

    async def append(self, h, ids, lines, t_sched, deadline):
        # No sessions: the client keeps the stream; nothing is sent.
        return self._acked(h, ids, lines, h.version + 1, t_sched, 0, 0.0)

    async def ask(self, h, q, flash_ask):
        body = {"model": SERVED_NAME, "prompt": h.context + list(q.ids), **self.sampling}
        r = await self.http.post("/v1/completions", json=body)
        if r.status_code >= 400:
            raise _err(r, "completion")
        out = r.json()
        usage = out.get("usage") or {}
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
        prompt = usage.get("prompt_tokens")
        return {
            "text": out["choices"][0]["text"],
            "context": (prompt - len(q.ids)) if prompt is not None else len(h.context),
            "computed_tokens": (prompt - cached) if prompt is not None and cached is not None else None,
        }

    async def warm_context(self, h: Handle) -> None:
        """The stock equivalent of "ingested": the context is in its prefix cache."""
        await self.warm_up(h.context)


class StatefulTarget(Target):
    kind = "stateful"
    label = "vllm-stateful"

    def __init__(self, http, clock, notes, sampling):
        super().__init__(http, clock, notes, sampling)
        self.staleness_ok = True  # the server takes ``max_staleness_ms``
        self.flash_on_create = True
        self.stats_fields_checked = False
        self.event_fields_checked = False
        self.session_fields_checked = False

    # ------------------------------------------------------------ sessions

    async def open(self, slot, generation, prefix, lines, flash):
        h = await super().open(slot, generation, prefix, lines, flash)
        body: dict[str, Any] = {"prefix": list(prefix), "ttl_s": 3600}
        spec = self._flash_spec(flash)
        if spec is not None and self.flash_on_create:
            body["flash"] = [spec]
        while True:
            r = await self.http.post("/v1/sessions", json=body)
            if r.status_code == 400 and "max_staleness_ms" in r.text and self.staleness_ok:
                self.staleness_ok = False
                self.notes.add("staleness", "the server refuses `max_staleness_ms` (flash "
                               "registration and completions): flash asks are sent without it, "
                               "so only answers of the newest ingested version can be hits")  # fmt: skip
                spec = self._flash_spec(flash)
                if "flash" in body:
                    body["flash"] = [spec]
                continue
            if r.status_code == 400 and "flash" in body and "flash" in r.text:
                self.flash_on_create = False
                del body["flash"]
                continue
            break
        if r.status_code >= 400:
            raise _err(r, "create session")
        out = r.json()
        h.session_id, h.token = out["id"], out["token"]
        h.version = out.get("version", 0)
        h.listener = asyncio.create_task(self._listen(h))
        if spec is not None and not self.flash_on_create:
            r = await self.http.post(f"/v1/sessions/{h.session_id}/flash", json=spec, headers=h.headers)
            if r.status_code >= 400:
                raise _err(r, "register flash")
        return h

    def _flash_spec(self, flash: dict | None) -> dict | None:
        if flash is None:
            return None
        spec = dict(flash)
        if not self.staleness_ok:
            spec.pop("max_staleness_ms", None)
        return spec

    async def _listen(self, h: Handle) -> None:
        path = f"/v1/sessions/{h.session_id}/events"
        timeout = httpx.Timeout(30.0, read=None)
        try:
            async with self.http.stream("GET", path, headers=h.headers, timeout=timeout) as r:
                if r.status_code >= 400:
                    return
                async for event, data in sse_lines(r):
                    t = self.clock()
                    try:
                        obj = json.loads(data)
                    except ValueError:
                        continue
                    d = obj.get("data") or {}
                    if event == "ingested":
                        h.ingested.append((obj["version"], t, d))
                        if not self.event_fields_checked:
                            self.event_fields_checked = True
                            missing = [k for k in ("lag_s", "backlog_tokens", "rate_tps") if k not in d]
                            if missing:
                                self.notes.add("event-fields", f"`ingested` events lack {missing}: "
                                               "lag is measured client-side only")  # fmt: skip
                    elif event == "flash":
                        h.flash_events.append((obj["version"], t, d))
                    elif event in ("closed", "evicted"):
                        return
        except (httpx.HTTPError, asyncio.CancelledError):
            return

    async def append(self, h, ids, lines, t_sched, deadline):
        retries, waited = 0, 0.0
        path = f"/v1/sessions/{h.session_id}/append"
        while True:
            r = await self.http.post(path, json={"token_ids": ids}, headers=h.headers)
            if r.status_code in (200, 202):
                return self._acked(h, ids, lines, r.json()["version"], t_sched, retries, waited)
            code = _code(r)
            if r.status_code == 429 and code == "session_budget_exceeded":
                raise NeedRotation(r.text[:200])
            if r.status_code == 413:
                raise NeedRotation(r.text[:200])
            if r.status_code == 503 and code == "ingestion_failed":
                # The session is intact; the server asks for the append again.
                self.notes.add("ingestion-failed", "some appends got 503 ingestion_failed and "
                               "were resent after Retry-After (counted with the 429s)")  # fmt: skip
            if r.status_code == 429 or (r.status_code == 503 and code == "ingestion_failed"):
                # Backlog full: nothing was taken; come back after Retry-After.
                if "retry-after" not in r.headers:
                    self.notes.add("retry-after", f"a 429 on append ({code}) had no Retry-After: "
                                   "the feeder retried after 1 s")  # fmt: skip
                delay = retry_after_s(r)
                if deadline is not None and self.clock() + delay >= deadline:
                    return None
                retries += 1
                waited += delay
                await asyncio.sleep(delay)
                continue
            raise _err(r, "append")

    async def append_wait(self, h: Handle, ids: list[int], lines) -> None:
        """Append and return once ingested (idle reference, capacity setup)."""
        path = f"/v1/sessions/{h.session_id}/append"
        while True:
            r = await self.http.post(path, json={"token_ids": ids}, headers=h.headers,
                                     params={"wait": "true"})  # fmt: skip
            if r.status_code == 429 and _code(r) != "session_budget_exceeded":
                await asyncio.sleep(retry_after_s(r))
                continue
            if r.status_code >= 400:
                raise _err(r, "append (wait)")
            self._acked(h, ids, lines, r.json()["version"], self.clock(), 0, 0.0)
            return

    async def wait_ingested(self, h: Handle, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = await self.stats(h)
            if st is None or st.get("ingested_version", -1) >= h.version:
                return True
            await asyncio.sleep(0.2)
        return False

    async def ask(self, h, q, flash_ask):
        body: dict[str, Any] = {"prompt": list(q.ids), **self.sampling}
        if flash_ask and self.staleness_ok and self.max_staleness_ms is not None:
            body["max_staleness_ms"] = self.max_staleness_ms
        path = f"/v1/sessions/{h.session_id}/completions"
        r = await self.http.post(path, json=body, headers=h.headers)
        if r.status_code == 400 and "max_staleness_ms" in r.text and "max_staleness_ms" in body:
            self.staleness_ok = False
            self.notes.add("staleness", "the server refuses `max_staleness_ms`: flash asks are "
                           "sent without it")  # fmt: skip
            del body["max_staleness_ms"]
            r = await self.http.post(path, json=body, headers=h.headers)
        if r.status_code >= 400:
            raise _err(r, "session completion")
        out = r.json()
        s = out.get("session") or {}
        if flash_ask and s.get("flash") and not self.session_fields_checked:
            self.session_fields_checked = True
            if "staleness_ms" not in s:
                self.notes.add("staleness-field", "flash hits carry no `session.staleness_ms`: "
                               "staleness is estimated client-side from `ingested` events")  # fmt: skip
        usage = out.get("usage") or {}
        prompt = usage.get("prompt_tokens")
        return {
            "text": out["choices"][0]["text"],
            "context": (prompt - len(q.ids)) if prompt is not None else None,
            "version": s.get("version"),
            "flash": bool(s.get("flash")),
            "staleness_ms": s.get("staleness_ms"),
            "computed_at": s.get("computed_at"),
            "computed_tokens": s.get("computed_tokens"),
        }

    max_staleness_ms: float | None = None

    async def stats(self, h):
        r = await self.http.get(f"/v1/sessions/{h.session_id}", headers=h.headers)
        if r.status_code >= 400:
            return None
        st = r.json()
        if not self.stats_fields_checked:
            self.stats_fields_checked = True
            missing = [k for k in ("ingested_tokens", "backlog_tokens", "ingest_lag_s",
                                   "ingest_rate_tps") if k not in st]  # fmt: skip
            if missing:
                self.notes.add("stats-fields", f"session stats lack {missing}: backlog is "
                               "computed client-side (acknowledged minus ingested tokens)")  # fmt: skip
        return st

    async def close(self, h):
        h.closed = True
        r = await self.http.delete(f"/v1/sessions/{h.session_id}", headers=h.headers)
        if r.status_code >= 400 and r.status_code != 404:
            raise _err(r, "close session")
        if h.listener is not None:
            try:
                await asyncio.wait_for(h.listener, 10)
            except asyncio.TimeoutError:
                h.listener.cancel()
