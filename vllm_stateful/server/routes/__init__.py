"""HTTP routes of the session API, one module per concern: ``sessions``
(create, list, stats, close, append, events), ``flash`` (register, list,
drop) and ``completions`` (session completions and chat, and vLLM's
``/v1/completions`` and ``/v1/chat/completions`` answered from a session
when the body names one). ``router`` has them all; the plugin mounts it.

Every handler validates everything before it calls the engine, and the
engine refuses bad input before it changes a session: a rejected request
changes nothing. The helpers every handler shares are in ``server/http.py``.
"""

from __future__ import annotations

from fastapi import APIRouter

from vllm_stateful.server.routes import completions, flash, sessions

router = APIRouter()
# In this order: the routes' order, and so the OpenAPI schema's, is as it
# was when they were one module.
for _module in (sessions, flash, completions):
    router.include_router(_module.router)

__all__ = ["router"]
