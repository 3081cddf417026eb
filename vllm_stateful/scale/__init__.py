"""Scale-out on Ray Serve: N replicas of the session server behind one
HTTP endpoint, every request of a session sent to the replica that holds it.

* ``config.py``: ``ScaleConfig``, the settings in one object;
* ``app.py``: the Serve application (``build_app`` for ``serve run`` and
  config files, ``application`` from Python);
* ``replica.py``: one replica, vLLM's own app with the session plugin;
* ``router.py``: the request router (session affinity, creates by free
  budget, the rest balanced);
* ``session_keys.py``: which session a request names, and session ids
  that name their replica;
* ``affinity.py`` and ``forward.py``: requests whose session id is only in
  the body, handed to the owner through Ray Serve;
* ``cluster.py``: the Ray cluster (a local one on the loopback address,
  ``loopback.py``), and the ``vllm-stateful serve --replicas`` command.

Ray is imported only when this package's modules are (it is an optional
dependency); ``session_keys`` needs nothing but the standard library.
"""

from __future__ import annotations

from typing import Any

__all__ = ["build_app"]


def __getattr__(name: str) -> Any:
    # `serve run vllm_stateful.scale:build_app` without importing Ray for
    # everything else in the package.
    if name == "build_app":
        from vllm_stateful.scale.app import build_app

        return build_app
    raise AttributeError(name)
