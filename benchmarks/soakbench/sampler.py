"""The soak's sessions and what is sampled from the server every interval.

:class:`SoakTarget` is the live-stream benchmark's session client
(``livebench.targets.StatefulTarget``: appends with 429 handling, questions,
one event stream read per session, flash registered at create) plus a second
flash query on every other session, and a count of what the client holds:
sessions whose close has not returned, creates and appends in flight. That
count bounds what the server may pin: a pin covers ingested tokens, which
the client has sent.

:class:`Sampler` takes one :class:`Sample`: resident memory of the server's
process tree (API process, engine core and its children), the engine's pins
and blocks from ``GET /v1/stateful/reconcile``, gauges from ``/metrics``
(sessions, ending sessions, event subscribers and the fullest event queue,
backlog tokens, vLLM's running and waiting requests) and the client's
counts.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass
from typing import Any

import httpx
import psutil
from livebench.targets import Handle, StatefulTarget, _err
from marketbench.servers import prometheus_counters

GAUGES = (
    "vllm_stateful_sessions",
    "vllm_stateful_sessions_ending",
    "vllm_stateful_pinned_tokens",
    "vllm_stateful_backlog_tokens",
    "vllm_stateful_event_subscribers",
    "vllm_stateful_event_queue_max",
    "vllm_stateful_flash_queries",
    "vllm_stateful_reconcile_mismatches",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
)
_BLOCK_SIZE = re.compile(r'^vllm:cache_config_info\{[^}]*block_size="(\d+)"', re.MULTILINE)


def blocks(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class SoakTarget(StatefulTarget):
    """Sessions as the live-stream benchmark opens them, counted."""

    def __init__(self, http, clock, notes, sampling, extra_flash: dict | None):
        super().__init__(http, clock, notes, sampling)
        self.extra_flash = extra_flash
        self.live: dict[int, Handle] = {}  # id -> handle whose close has not returned
        # Of those, the ones being closed: their event stream may already
        # have ended (the "closed" event comes before close returns).
        self.closing: set[int] = set()
        self.creating: list[int] = []  # prefix lengths of creates in flight
        self.sending: dict[int, int] = {}  # id(handle) -> tokens of appends in flight
        self.opened = self.closed_count = self.flash_registered = 0
        self.answered = self.question_errors = 0

    async def open(self, slot, generation, prefix, lines, flash):
        self.creating.append(len(prefix))
        try:
            h = await super().open(slot, generation, prefix, lines, flash)
        finally:
            self.creating.remove(len(prefix))
        self.live[id(h)] = h
        self.opened += 1
        self.flash_registered += flash is not None
        if flash is not None and self.extra_flash is not None and slot % 2 == 0:
            r = await self.http.post(f"/v1/sessions/{h.session_id}/flash",
                                     json=self._flash_spec(self.extra_flash), headers=h.headers)  # fmt: skip
            if r.status_code >= 400:
                raise _err(r, "register the second flash query")
            self.flash_registered += 1
        return h

    async def append(self, h, ids, lines, t_sched, deadline):
        self.sending[id(h)] = self.sending.get(id(h), 0) + len(ids)
        try:
            return await super().append(h, ids, lines, t_sched, deadline)
        finally:
            self.sending[id(h)] -= len(ids)

    async def ask(self, h, q, flash_ask):
        try:
            out = await super().ask(h, q, flash_ask)
        except Exception:
            self.question_errors += 1
            raise
        self.answered += 1
        return out

    async def close(self, h):
        self.closing.add(id(h))
        try:
            await super().close(h)
        finally:
            self.closing.discard(id(h))
            self.live.pop(id(h), None)
            self.sending.pop(id(h), None)
            self.closed_count += 1

    def holdings(self) -> tuple[dict[int, int], list[int]]:
        """(tokens each live session may hold: acknowledged + in flight,
        prefix lengths of creates in flight)."""
        held = {k: len(h.context) + self.sending.get(k, 0) for k, h in self.live.items()}
        return held, list(self.creating)

    def open_sessions(self) -> list[Handle]:
        """Live sessions not being closed: each must have its stream open."""
        return [h for k, h in self.live.items() if k not in self.closing]

    def open_streams(self) -> int:
        return sum(
            1 for h in self.open_sessions() if h.listener is not None and not h.listener.done()
        )


@dataclass
class Sample:
    t: float  # seconds since the sampler started
    phase: str  # "baseline" (before the sessions), "run", "end" (all closed)
    rss_mb: float  # the server's process tree
    api_rss_mb: float  # the API server process
    engine_rss_mb: float  # its children: engine core (and workers)
    pinned_blocks: int | None
    free_blocks: int | None
    total_blocks: int | None
    engine_pinned_tokens: int | None
    api_pinned_tokens: int | None
    engine_pins: int | None
    reconcile_agree: bool | None
    mismatches: int | None
    reconcile_skipped: int | None
    sessions: float | None  # gauges from /metrics from here
    sessions_ending: float | None
    event_subscribers: float | None
    event_queue_max: float | None
    backlog_tokens: float | None
    flash_queries: float | None
    requests_running: float | None
    requests_waiting: float | None
    client_sessions: int  # the client's counts from here
    client_streams: int
    tokens_bound: int  # tokens the client's sessions may hold
    blocks_bound: int  # blocks those tokens fill, session by session
    opened: int
    answered: int
    question_errors: int
    sample_s: float  # how long the sample took


def rss_split(pid: int) -> tuple[int, int]:
    """(resident bytes of ``pid``, of all its descendants together)."""
    try:
        root = psutil.Process(pid)
        own, kids = root.memory_info().rss, root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    rest = 0
    for child in kids:
        try:
            rest += child.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return own, rest


def gauges(text: str) -> dict[str, float | None]:
    """The GAUGES present in /metrics text (None for an absent one)."""
    values = prometheus_counters(text, GAUGES)
    present = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    return {n: (values[n] if n in present else None) for n in GAUGES}


class Sampler:
    def __init__(self, http: httpx.AsyncClient, pid: int, target: SoakTarget):
        self.http, self.pid, self.target = http, pid, target
        self.t0 = time.monotonic()
        self.block_size: int | None = None
        self.samples: list[Sample] = []
        self.mismatch_kinds: dict[str, int] = {}

    async def _metrics(self) -> dict[str, float | None]:
        r = await self.http.get("/metrics")
        if r.status_code != 200:
            return dict.fromkeys(GAUGES)
        if self.block_size is None:
            m = _BLOCK_SIZE.search(r.text)
            self.block_size = int(m.group(1)) if m else None
        return gauges(r.text)

    async def take(self, phase: str) -> Sample:
        t_start = time.monotonic()
        # The client's holdings before and after the probe, per session: a
        # session closed meanwhile still counts, a session's tokens only grow.
        held0, creating0 = self.target.holdings()
        r = await self.http.get("/v1/stateful/reconcile")
        rec: dict[str, Any] = r.json() if r.status_code == 200 else {}
        g = await self._metrics()
        held1, creating1 = self.target.holdings()
        held = {**held0, **{k: max(v, held0.get(k, 0)) for k, v in held1.items()}}
        creating = max(creating0, creating1, key=sum)
        bs = self.block_size or 128
        for m in rec.get("mismatches", []):
            self.mismatch_kinds[m["kind"]] = self.mismatch_kinds.get(m["kind"], 0) + 1
        api, engine = rss_split(self.pid)
        s = Sample(
            t=t_start - self.t0, phase=phase,
            rss_mb=(api + engine) / 2**20, api_rss_mb=api / 2**20, engine_rss_mb=engine / 2**20,
            pinned_blocks=rec.get("pinned_blocks"), free_blocks=rec.get("free_blocks"),
            total_blocks=rec.get("total_blocks"),
            engine_pinned_tokens=rec.get("engine_pinned_tokens"),
            api_pinned_tokens=rec.get("api_pinned_tokens"), engine_pins=rec.get("engine_pins"),
            reconcile_agree=rec.get("agree"),
            mismatches=len(rec["mismatches"]) if "mismatches" in rec else None,
            reconcile_skipped=rec.get("skipped"),
            sessions=g["vllm_stateful_sessions"], sessions_ending=g["vllm_stateful_sessions_ending"],
            event_subscribers=g["vllm_stateful_event_subscribers"],
            event_queue_max=g["vllm_stateful_event_queue_max"],
            backlog_tokens=g["vllm_stateful_backlog_tokens"],
            flash_queries=g["vllm_stateful_flash_queries"],
            requests_running=g["vllm:num_requests_running"],
            requests_waiting=g["vllm:num_requests_waiting"],
            client_sessions=len(self.target.open_sessions()),
            client_streams=self.target.open_streams(),
            tokens_bound=sum(held.values()) + sum(creating),
            blocks_bound=sum(blocks(n, bs) for n in [*held.values(), *creating]),
            opened=self.target.opened, answered=self.target.answered,
            question_errors=self.target.question_errors,
            sample_s=time.monotonic() - t_start,
        )  # fmt: skip
        self.samples.append(s)
        return s

    async def every(self, interval_s: float, phase: str, on_sample) -> None:
        """A sample at 0, interval, 2 x interval, ... (no drift) until cancelled."""
        k = 0
        start = time.monotonic()
        while True:
            try:
                on_sample(await self.take(phase))
            except (httpx.HTTPError, ValueError) as exc:  # a missed sample is recorded as such
                print(f"[soak] sample failed: {type(exc).__name__}: {exc}", flush=True)
            k += 1
            await asyncio.sleep(max(0.0, start + k * interval_s - time.monotonic()))
