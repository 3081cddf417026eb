"""Session KV out of vLLM's KV pool: host memory, then disk.

Worker side: ``OffloadStore.save`` copies a session's blocks (every layer)
into host memory at once, inside the engine step, and a background thread
writes them to ``<dir>/<key>.kv`` with the token ids beside them in
``<key>.tokens`` (written last: its presence means the KV file is complete).
``load`` reads them back from memory, or from disk once written. Scheduler
side: ``stored_tokens`` reads the token ids of a file that an earlier run of
the engine wrote (after a restart).

The directory is ``VLLM_STATEFUL_OFFLOAD_DIR`` (default
``~/.cache/vllm-stateful/offload``); file names are session keys (random,
unique per session), so servers may share it.
"""

from __future__ import annotations

import os
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

OFFLOAD_DIR_ENV = "VLLM_STATEFUL_OFFLOAD_DIR"


def offload_dir() -> Path:
    raw = os.environ.get(OFFLOAD_DIR_ENV, "").strip()
    path = Path(raw) if raw else Path.home() / ".cache" / "vllm-stateful" / "offload"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _paths(key: str) -> tuple[Path, Path]:
    base = offload_dir()
    return base / f"{key}.kv", base / f"{key}.tokens"


def stored_tokens(key: str) -> list[int] | None:
    """Token ids of a complete file for ``key``, if one exists."""
    kv, tokens = _paths(key)
    if not (kv.exists() and tokens.exists()):
        return None
    out = array("i")
    out.frombytes(tokens.read_bytes())
    return out.tolist()


class OffloadStore:
    def __init__(self) -> None:
        self._memory: dict[str, list[torch.Tensor]] = {}
        self._lock = threading.Lock()
        # One writer: files are written in the order sessions were offloaded.
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="vllm-stateful-offload")

    def save(self, key: str, caches: list[torch.Tensor], block_ids: list[int], tokens: list[int]) -> None:
        index = torch.tensor(block_ids, dtype=torch.long)
        copies = [cache.index_select(0, index) for cache in caches]  # new host tensors
        with self._lock:
            self._memory[key] = copies
        self._writer.submit(self._write, key, copies, tokens)

    def _write(self, key: str, copies: list[torch.Tensor], tokens: list[int]) -> None:
        kv, tok = _paths(key)
        torch.save(copies, f"{kv}.tmp")
        os.replace(f"{kv}.tmp", kv)
        tok.with_suffix(".tmp").write_bytes(array("i", tokens).tobytes())
        os.replace(tok.with_suffix(".tmp"), tok)
        with self._lock:
            if self._memory.get(key) is copies:  # not dropped or saved again meanwhile
                del self._memory[key]

    def load(self, key: str, caches: list[torch.Tensor], src: list[int], dst: list[int]) -> None:
        with self._lock:
            copies = self._memory.get(key)
        if copies is None:
            copies = torch.load(_paths(key)[0], mmap=True, weights_only=True)
        src_index = torch.tensor(src, dtype=torch.long)
        dst_index = torch.tensor(dst, dtype=torch.long)
        for cache, saved in zip(caches, copies, strict=True):
            cache.index_copy_(0, dst_index, saved.index_select(0, src_index))

    def drop(self, key: str) -> None:
        with self._lock:
            self._memory.pop(key, None)
        # After any write of this key still queued.
        self._writer.submit(_remove, key)


def _remove(key: str) -> None:
    for path in _paths(key):
        path.unlink(missing_ok=True)
