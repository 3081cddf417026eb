"""The Ray Serve request router of the session server.

Three kinds of request, told apart by what Ray's HTTP proxy hands the router
(the path and headers; the body is streamed to the replica afterwards, so
it is not visible here):

* a request of a session (``/v1/sessions/{id}/...``, or any request with
  Ray Serve's session header ``x-session-id``) goes to the replica that
  holds the session and nowhere else: to the replica named in a minted id
  while it lives, else to the session id's place on Ray's consistent-hash
  ring (client-chosen ids are created there too, see ``affinity.py``);
* a create (``POST /v1/sessions``) goes to the replica with the most free
  session budget, as its replica reported it (``record_routing_stats``),
  less what this router has sent it since;
* everything else is balanced by queue length, as Ray's default router does.

It subclasses Ray's ``ConsistentHashRouter`` for the ring (the same ring on
every proxy, rebuilt from the controller's replica broadcast) and for its
routing loop, which keeps a keyed request with the task that popped it.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import dataclass
from typing import Any

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, ReplicaID, RunningReplica
from vllm.logger import init_logger

from vllm_stateful.scale.session_keys import RequestKey, key_of, replica_of

logger = init_logger(f"vllm.{__name__}")

# Keys of the dict a replica returns from ``record_routing_stats``.
FREE_TOKENS = "free_budget_tokens"
SESSIONS = "sessions"
BLOCK_SIZE = "block_size"
SEQ = "seq"


@dataclass
class _Sent:
    """Creates this router sent a replica since its last stats report."""

    seq: int = -1  # the report they are counted against
    creates: int = 0


class SessionRouter(ConsistentHashRouter):
    """Session affinity, creates by free budget, the rest balanced."""

    def initialize_state(self, **kwargs: Any) -> None:
        # Strict affinity: a session lives on exactly one replica, so a busy
        # owner is waited for (with backoff), never replaced by another one.
        kwargs.setdefault("num_fallback_replicas", 0)
        super().initialize_state(**kwargs)
        self._sent: dict[ReplicaID, _Sent] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        key = request_key(pending_request)
        if key.session_id is not None:
            pending_request.routing_context.should_backoff = True
            return [[self.owner(key.session_id, candidate_replicas)]]
        if key.creates:
            return self.by_free_budget(candidate_replicas)
        # Stateless: two random candidates, the base class takes the one with
        # the shorter queue (power of two choices).
        pending_request.routing_context.should_backoff = True
        return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]

    def owner(self, session_id: str, candidates: list[RunningReplica]) -> RunningReplica:
        """The replica that holds (or will hold) ``session_id``."""
        tag = replica_of(session_id)
        if tag is not None:
            for r in candidates:
                if r.replica_id.unique_id == tag:
                    return r
        # A client-chosen id, or the replica that minted it is gone (then
        # the session went with it: the owner by hash answers 404).
        ranked = self._lookup_ranked_replicas(session_id)
        by_id = {r.replica_id: r for r in candidates}
        for rid in ranked:
            if rid in by_id:
                return by_id[rid]
        return candidates[0]  # the ring lags the candidate list for a moment

    def by_free_budget(self, candidates: list[RunningReplica]) -> list[list[RunningReplica]]:
        """Candidates best first: most free budget, then fewest sessions,
        counting the creates sent since each replica's last report. The
        create is counted against the first choice here (Ray reports the
        replica it finally took only under strict ``max_ongoing_requests``);
        the first is passed over only when its queue is full."""
        ranked = sorted(candidates, key=self._room, reverse=True)
        best = ranked[0]
        seq = (best.routing_stats or {}).get(SEQ, -1)
        sent = self._sent.setdefault(best.replica_id, _Sent())
        if sent.seq != seq:  # a newer report counts the creates sent before it
            sent.seq, sent.creates = seq, 0
        sent.creates += 1
        return [[r] for r in ranked]

    def _room(self, replica: RunningReplica) -> tuple[float, float]:
        stats = replica.routing_stats or {}
        sent = self._sent.get(replica.replica_id)
        pending = sent.creates if sent is not None and sent.seq == stats.get(SEQ, -1) else 0
        if FREE_TOKENS not in stats:
            # No report yet (a new replica): empty, so first, but the creates
            # sent to it still count.
            return (float("inf"), -float(pending))
        sessions = stats.get(SESSIONS, 0)
        # A create's size is unknown here (the prefix is in the body): count
        # it as the replica's mean session, at least one block.
        mean = (stats.get("pinned_tokens", 0) / sessions) if sessions else 0.0
        cost = max(float(stats.get(BLOCK_SIZE, 1)), mean)
        return (stats[FREE_TOKENS] - pending * cost, -float(sessions + pending))


def request_key(pending_request: PendingRequest) -> RequestKey:
    """The routing key of a pending request.

    Ray's proxy puts the session header into ``metadata.session_id``; the
    path and method are in the ASGI scope it sends to the replica (the
    request's only argument, pickled). Handle calls (``forward`` between
    replicas) carry ``session_id`` in their metadata.
    """
    meta = pending_request.metadata
    method, path = _method_and_path(pending_request)
    return key_of(method, path, meta.session_id or None)


def _method_and_path(pending_request: PendingRequest) -> tuple[str, str]:
    args = pending_request.args
    if not (args and isinstance(args[0], bytes)):
        return "", ""
    try:
        scope = pickle.loads(args[0]).asgi_scope
        return scope.get("method", ""), scope.get("path", "")
    except Exception:  # not an HTTP request from Ray's proxy
        return "", ""
