"""How each engine is asked, over HTTP, as its users would ask it.

* :class:`SessionDriver`: vllm-stateful sessions. Appends go to the session
  as they arrive (202, ingested in the background); a question sends only
  its own tokens, with ``consistency="latest"`` so the answer covers every
  tick appended before it, exactly the context the other engines get.
* :class:`FlashDriver`: the same sessions with the questions registered as
  flash queries; a question is asked once the flash answer for the newest
  version exists, and is timed as the hit it is.
* :class:`FullPromptDriver`: stock servers (vLLM, llama.cpp, SGLang,
  TensorRT-LLM). The client keeps the context; every question sends context
  + question to ``/v1/completions``, as token ids where the server takes
  them (llama-cpp-python's server takes text only).

Answers are greedy, ``max_tokens`` from the question set. Streamed answers
give time to first token (first chunk) and end to end (``[DONE]``).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx

from marketbench.engines import SERVED_NAME
from marketbench.questions import QuestionSet
from marketbench.workloads import Ask, SessionPlan, Step

TOKEN_HEADER = "X-Session-Token"


class DriverUnavailable(RuntimeError):
    """The server lacks what this driver needs (e.g. the flash routes)."""


@dataclass
class Answer:
    text: str
    e2e_s: float
    ttft_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int | None = None
    computed_tokens: int | None = None
    flash: bool | None = None
    server_s: float | None = None
    flash_wait_s: float | None = None
    pending_ingest: bool | None = None


@dataclass
class Handle:
    """Client-side state of one session on one engine."""

    plan: SessionPlan
    context_ids: list[int]
    context_text: str
    session_id: str | None = None
    token: str | None = None
    version: int = 0
    appended: list[tuple[int, int, float]] = field(
        default_factory=list
    )  # (version, tokens, t sent)
    ingested: list[tuple[int, float]] = field(default_factory=list)  # (version, t)
    flash_seen: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (version, t)
    flash_changed: asyncio.Event = field(default_factory=asyncio.Event)
    listener: asyncio.Task | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {TOKEN_HEADER: self.token} if self.token else {}


async def sse_lines(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of each server-sent event."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip(" "))


def raise_for(r: httpx.Response, what: str) -> None:
    if r.status_code >= 400:
        raise RuntimeError(f"{what}: HTTP {r.status_code}: {r.text[:500]}")


def server_seconds(r: httpx.Response, body: dict[str, Any] | None) -> float | None:
    """A server-side duration, if the server reports one (a Server-Timing
    header, or a timing field in the session object)."""
    timing = r.headers.get("server-timing")
    if timing and "dur=" in timing:
        try:
            return float(timing.split("dur=")[1].split(",")[0].split(";")[0]) / 1e3
        except ValueError:
            pass
    info = (body or {}).get("session") or {}
    for name, scale in (
        ("server_ms", 1e-3),
        ("elapsed_ms", 1e-3),
        ("latency_ms", 1e-3),
        ("server_s", 1.0),
    ):
        if isinstance(info.get(name), (int, float)):
            return float(info[name]) * scale
    return None


async def stream_completion(http: httpx.AsyncClient, path: str, body: dict[str, Any],
                            headers: dict[str, str] | None = None) -> Answer:  # fmt: skip
    """POST a streamed completion; time the first chunk and the end."""
    t0 = time.perf_counter()
    ttft = None
    text, chunks = [], 0
    usage: dict[str, Any] = {}
    async with http.stream("POST", path, json=body, headers=headers) as r:
        if r.status_code >= 400:
            raise RuntimeError(f"{path}: HTTP {r.status_code}: {(await r.aread())[:500]!r}")
        # vllm-stateful sends its headers with the first chunk: its
        # Server-Timing is then the server-side time to first token.
        server = server_seconds(r, None)
        async for _, data in sse_lines(r):
            if data == "[DONE]":
                break
            obj = json.loads(data)
            if "error" in obj:
                raise RuntimeError(f"{path}: {obj['error']}")
            if obj.get("usage"):
                usage = obj["usage"]
            for choice in obj.get("choices") or []:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                if choice.get("text"):
                    text.append(choice["text"])
                    chunks += 1
    e2e = time.perf_counter() - t0
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    prompt = usage.get("prompt_tokens")
    return Answer(
        text="".join(text),
        e2e_s=e2e,
        ttft_s=ttft,
        completion_tokens=usage.get("completion_tokens", chunks),
        prompt_tokens=prompt,
        computed_tokens=(prompt - cached) if prompt is not None and cached is not None else None,
        server_s=server,
    )


class Driver:
    row: str

    def __init__(self, http: httpx.AsyncClient, qset: QuestionSet, clock: Any):
        self.http, self.qset, self.clock = http, qset, clock
        self.max_tokens = qset.max_tokens

    def sampling(self) -> dict[str, Any]:
        """Greedy, ``max_tokens``; fixed-length answers when the question set
        asks for them (vLLM's, SGLang's and TensorRT-LLM's ``ignore_eos``)."""
        out: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": 0}
        if self.qset.ignore_eos:
            out["ignore_eos"] = True
        return out

    async def open(self, plan: SessionPlan) -> Handle:
        return Handle(plan, list(plan.prefix), plan.prefix_text)

    async def append(self, h: Handle, step: Step) -> None:
        h.context_ids += step.tokens
        h.context_text += step.text

    async def ask(self, h: Handle, ask: Ask, ids: list[int]) -> Answer:
        raise NotImplementedError

    async def close(self, h: Handle) -> dict[str, Any]:
        return {}

    async def stateless(self, ids: list[int], text: str) -> None:
        """One request of background traffic (no session)."""
        body = {
            "model": SERVED_NAME,
            "prompt": self.prompt(ids, text),
            "max_tokens": 16,
            "temperature": 0,
        }
        r = await self.http.post("/v1/completions", json=body)
        raise_for(r, "stateless completion")

    def prompt(self, ids: list[int], text: str) -> list[int] | str:
        return ids


class FullPromptDriver(Driver):
    """``text_prompts``: llama-cpp-python's server, which takes text only and
    has no ``ignore_eos``; a -100 logit bias on its end-of-generation tokens
    (``eog_ids``) makes its answers the same fixed length."""

    def __init__(
        self, http, qset, clock, row: str, text_prompts: bool = False, eog_ids: tuple[int, ...] = ()
    ):
        super().__init__(http, qset, clock)
        self.row, self.text_prompts, self.eog_ids = row, text_prompts, eog_ids

    def prompt(self, ids: list[int], text: str) -> list[int] | str:
        return text if self.text_prompts else ids

    def sampling(self) -> dict[str, Any]:
        out = super().sampling()
        if self.text_prompts and out.pop("ignore_eos", False) and self.eog_ids:
            out["logit_bias"] = {str(t): -100.0 for t in self.eog_ids}
        return out

    async def ask(self, h: Handle, ask: Ask, ids: list[int]) -> Answer:
        body = {
            "model": SERVED_NAME,
            "prompt": self.prompt(
                h.context_ids + ids, h.context_text + self.qset.prompt(ask.question)
            ),
            **self.sampling(),
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        return await stream_completion(self.http, "/v1/completions", body)

    async def text_tokens_match(self, h: Handle, ask: Ask, ids: list[int]) -> bool | None:
        """For text prompts: does the server tokenize the full prompt into the
        token log every other engine answers? (llama-cpp-python's
        ``/extras/tokenize``; None where there is no such route.)"""
        if not self.text_prompts:
            return None
        text = h.context_text + self.qset.prompt(ask.question)
        r = await self.http.post("/extras/tokenize", json={"input": text})
        if r.status_code != 200:
            return None
        return r.json().get("tokens") == h.context_ids + ids


class SessionDriver(Driver):
    row = "vllm-stateful"

    async def open(self, plan: SessionPlan) -> Handle:
        h = await super().open(plan)
        r = await self.http.post("/v1/sessions", json=self.create_body(plan))
        raise_for(r, "create session")
        out = r.json()
        h.session_id, h.token, h.version = out["id"], out["token"], out.get("version", 0)
        await self.after_create(h)
        h.listener = asyncio.create_task(self._listen(h))
        return h

    def create_body(self, plan: SessionPlan) -> dict[str, Any]:
        return {"prefix": list(plan.prefix)}

    async def after_create(self, h: Handle) -> None:
        pass

    async def _listen(self, h: Handle) -> None:
        """Session events: when each version was ingested, and flash answers."""
        timeout = httpx.Timeout(10.0, read=None)
        path = f"/v1/sessions/{h.session_id}/events"
        async with self.http.stream("GET", path, headers=h.headers, timeout=timeout) as r:
            if r.status_code >= 400:
                return
            async for event, data in sse_lines(r):
                now = self.clock()
                try:
                    obj = json.loads(data)
                except ValueError:
                    continue
                if event == "ingested":
                    h.ingested.append((obj["version"], now))
                elif event == "flash":
                    fid = (obj.get("data") or {}).get("flash_id")
                    if fid is not None:
                        h.flash_seen[fid] = (obj["version"], now)
                        h.flash_changed.set()
                elif event in ("closed", "evicted"):
                    return

    async def append(self, h: Handle, step: Step) -> None:
        await super().append(h, step)
        sent = self.clock()  # the lag to ingestion counts from here
        r = await self.http.post(
            f"/v1/sessions/{h.session_id}/append",
            json={"token_ids": step.tokens},
            headers=h.headers,
        )
        raise_for(r, "append")
        h.version = r.json()["version"]
        h.appended.append((h.version, len(step.tokens), sent))

    async def ask(self, h: Handle, ask: Ask, ids: list[int]) -> Answer:
        # Whether the newest append was still being ingested when the
        # question left (then "latest" makes the answer wait for it).
        pending = not any(v >= h.version for v, _ in h.ingested)
        body = {
            "prompt": ids,
            **self.sampling(),
            "stream": True,
            "stream_options": {"include_usage": True},
            "consistency": "latest",
        }
        answer = await stream_completion(
            self.http, f"/v1/sessions/{h.session_id}/completions", body, h.headers
        )
        answer.pending_ingest = pending
        return answer

    async def close(self, h: Handle) -> dict[str, Any]:
        r = await self.http.get(f"/v1/sessions/{h.session_id}", headers=h.headers)
        stats = r.json() if r.status_code == 200 else {}
        r = await self.http.delete(f"/v1/sessions/{h.session_id}", headers=h.headers)
        raise_for(r, "close session")
        if h.listener is not None:
            try:
                await asyncio.wait_for(h.listener, 10)
            except (asyncio.TimeoutError, httpx.HTTPError):
                h.listener.cancel()
        return stats


class FlashDriver(SessionDriver):
    row = "vllm-stateful flash"
    # A flash answer waits for idle engine time; past this the question is
    # asked anyway (and recorded as a miss if it is one).
    wait_timeout_s = 300.0

    def __init__(self, http, qset, clock):
        super().__init__(http, qset, clock)
        self.per_route = False  # create does not take "flash": register one by one

    def flash_specs(self, plan: SessionPlan) -> list[dict[str, Any]]:
        return [
            {"prompt": self.qset.prompt(q), **self.sampling(), "id": q.id} for q in plan.questions()
        ]

    def create_body(self, plan: SessionPlan) -> dict[str, Any]:
        body: dict[str, Any] = {"prefix": list(plan.prefix)}
        if not self.per_route:
            body["flash"] = self.flash_specs(plan)
        return body

    async def open(self, plan: SessionPlan) -> Handle:
        try:
            return await super().open(plan)
        except RuntimeError as exc:
            if self.per_route or "flash" not in str(exc):
                raise
        self.per_route = True
        return await super().open(plan)

    async def after_create(self, h: Handle) -> None:
        if not self.per_route:
            return
        for spec in self.flash_specs(h.plan):
            r = await self.http.post(
                f"/v1/sessions/{h.session_id}/flash", json=spec, headers=h.headers
            )
            if r.status_code in (404, 405):
                await self.http.delete(f"/v1/sessions/{h.session_id}", headers=h.headers)
                raise DriverUnavailable(
                    "the server has no flash route (POST /v1/sessions/{id}/flash)"
                )
            raise_for(r, "register flash")

    async def ask(self, h: Handle, ask: Ask, ids: list[int]) -> Answer:
        qid = ask.question.id
        t0 = time.perf_counter()
        deadline = t0 + self.wait_timeout_s
        # Wait for this question's answer on the newest version (pushed as a
        # `flash` event), as a client that reads pushed answers would.
        while h.flash_seen.get(qid, (-1, 0.0))[0] < h.version:
            h.flash_changed.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(h.flash_changed.wait(), left)
            except asyncio.TimeoutError:
                break
        waited = time.perf_counter() - t0
        body = {
            "prompt": self.qset.prompt(ask.question),
            **self.sampling(),
            "consistency": "latest",
        }
        start = time.perf_counter()
        r = await self.http.post(
            f"/v1/sessions/{h.session_id}/completions", json=body, headers=h.headers
        )
        e2e = time.perf_counter() - start
        raise_for(r, "flash query")
        out = r.json()
        usage = out.get("usage") or {}
        session = out.get("session") or {}
        return Answer(
            text=out["choices"][0]["text"],
            e2e_s=e2e,
            completion_tokens=usage.get("completion_tokens", 0),
            prompt_tokens=usage.get("prompt_tokens"),
            computed_tokens=session.get("computed_tokens"),
            flash=bool(session.get("flash")),
            server_s=server_seconds(r, out),
            flash_wait_s=waited,
        )
