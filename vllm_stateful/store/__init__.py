"""The durable session log: sessions survive a restart of the server."""

from vllm_stateful.store.location import default_store_path
from vllm_stateful.store.records import StoredFlash, StoredSession
from vllm_stateful.store.sqlite import SYNC_MODES, SessionStore, StoreError

__all__ = [
    "SYNC_MODES",
    "SessionStore",
    "StoreError",
    "StoredFlash",
    "StoredSession",
    "default_store_path",
]
