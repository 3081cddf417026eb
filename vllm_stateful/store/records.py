"""What the store keeps of a session: enough to rebuild it after a restart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StoredFlash:
    id: str
    prompt: str | list[int]  # as registered
    # Every field of ``sampling_fields.SAMPLING_FIELDS`` (the cache key).
    sampling: dict[str, Any]
    only_changed: bool = False
    max_staleness_ms: float | None = None


@dataclass(frozen=True)
class StoredSession:
    id: str
    # The engine-side key (pin, cache salt, offload file): kept, so KV files
    # of an offloaded session are found again after a restart.
    key: str
    # sha256 of the access token: the token itself is never written, yet the
    # restored session still opens with it.
    token_hash: str
    tenant: str
    ttl_s: float | None
    created_at: float  # wall clock
    last_used: float  # wall clock: expiry keeps counting across a restart
    # Version v is the first ``lengths[v - first_version]`` tokens, as in
    # ``Session``; after a slide, the prefix plus the appends kept.
    tokens: list[int]
    lengths: list[int]
    flash: list[StoredFlash] = field(default_factory=list)
    # The context-overflow policy (engine/window.py) and what it has done.
    overflow: str = "reject"
    max_tokens: int | None = None
    first_version: int = 0
    prefix_len: int | None = None  # None: lengths[0] (nothing dropped)
    dropped_tokens: int = 0
    slides: int = 0

    @property
    def version(self) -> int:
        return self.first_version + len(self.lengths) - 1
