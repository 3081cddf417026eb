"""Reconciliation: do the engine's pins and the API's accounting agree?

The engine side knows which session keys hold pins and how many tokens each
pins (a PROBE report); the API side knows each session's ``pinned_tokens``.
They agree when every session's count equals its pin and no pin belongs to a
session the API no longer knows. A session whose ingestion or release is in
flight is skipped (its pin is changing under the probe) and counted as such.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from vllm_stateful.engine.session import Session, SessionState


@dataclass(frozen=True)
class Mismatch:
    kind: str  # "tokens_differ" | "pin_without_session"
    key: str  # the session key (the engine's name for it)
    session_id: str | None  # None for a pin without a session
    api_tokens: int
    engine_tokens: int


@dataclass(frozen=True)
class Reconciliation:
    agree: bool
    mismatches: list[Mismatch]
    details: list[str]  # one readable line per mismatch or notable state
    open_sessions: int  # creating or active
    ending_sessions: int  # closing or failed: still budgeted
    failed_sessions: int  # release not acknowledged; retried
    skipped: int  # ingestion or release in flight: not compared
    api_pinned_tokens: int
    engine_pinned_tokens: int
    engine_pins: int  # sessions with a pin in the engine
    pinned_blocks: int
    free_blocks: int
    total_blocks: int


@dataclass
class _Tally:
    mismatches: list[Mismatch] = field(default_factory=list)
    details: list[str] = field(default_factory=list)
    skipped: int = 0


def _in_flight(session: Session) -> bool:
    ingesting = session.ingest_task is not None and not session.ingest_task.done()
    # A slide in flight: a window being built or a retired key not yet closed.
    sliding = session.window is not None or bool(session.retiring)
    return ingesting or sliding or session.state in (SessionState.CREATING, SessionState.CLOSING)


def busy_keys(sessions: Iterable[Session]) -> set[str]:
    """Keys of the sessions whose pins may change under a probe sent now:
    not active (creating, restoring, closing, failed), moving between the
    engine and the offload store, or ingesting or sliding."""
    return {
        s.key for s in sessions
        if s.state is not SessionState.ACTIVE or s.residency is not None or _in_flight(s)
    }  # fmt: skip


def reconcile(
    sessions: Iterable[Session],
    busy_keys: set[str],
    engine_pins: dict[str, int],
    kv: tuple[int, int, int],
) -> Reconciliation:
    """Compare ``sessions`` (every budgeted one) with ``engine_pins`` (key ->
    pinned tokens, from a PROBE). ``busy_keys``: sessions that were in flight
    when the probe was sent. ``kv``: (pinned, free, total) blocks."""
    sessions = list(sessions)
    tally = _Tally()
    known: set[str] = set()
    for s in sessions:
        known.add(s.key)
        # A slide's other keys (engine/slide.py) are the session's pins too.
        known.update(s.retiring)
        if s.window is not None:
            known.add(s.window.key)
        engine_tokens = engine_pins.get(s.key, 0)
        if s.key in busy_keys or _in_flight(s):
            tally.skipped += 1
            continue
        if s.pinned_tokens != engine_tokens:
            tally.mismatches.append(
                Mismatch("tokens_differ", s.key, s.id, s.pinned_tokens, engine_tokens)
            )
            tally.details.append(
                f"session '{s.id}' ({s.state.value}): API counts {s.pinned_tokens} pinned "
                f"tokens, the engine pins {engine_tokens}"
            )
    for key, tokens in engine_pins.items():
        if key not in known:
            tally.mismatches.append(Mismatch("pin_without_session", key, None, 0, tokens))
            tally.details.append(f"the engine pins {tokens} tokens for no live session (key {key})")
    failed = [s for s in sessions if s.state is SessionState.FAILED]
    for s in failed:
        tally.details.append(f"session '{s.id}': release failed, retried ({s.closed_reason})")
    pinned, free, total = kv
    return Reconciliation(
        agree=not tally.mismatches,
        mismatches=tally.mismatches,
        details=tally.details,
        open_sessions=sum(1 for s in sessions if s.state.open),
        ending_sessions=sum(1 for s in sessions if not s.state.open),
        failed_sessions=len(failed),
        skipped=tally.skipped,
        api_pinned_tokens=sum(s.pinned_tokens for s in sessions),
        engine_pinned_tokens=sum(engine_pins.values()),
        engine_pins=len(engine_pins),
        pinned_blocks=pinned,
        free_blocks=free,
        total_blocks=total,
    )
