"""Where a server keeps its session store by default.

One file per server: under the user's state directory (``$XDG_STATE_HOME``,
else ``~/.local/state``), named after the served model and the port. Two
servers running at once on one machine cannot share a port, so they never
share a file (a lock next to the file guards against a store named twice
by hand); a server restarted with the same model and port finds its
sessions again.
"""

from __future__ import annotations

import os
import re
from pathlib import Path


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "vllm-stateful"


def default_store_path(model: str, port: int) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", model.strip("/").rsplit("/", 1)[-1]) or "model"
    return state_dir() / f"sessions-{name}-{port}.sqlite3"
