"""HTTP surface of vllm-stateful: an endpoint plugin for vLLM's OpenAI server.

The modules here are split so that the client can share the wire format
without vLLM: ``schemas`` and ``errors`` import only pydantic; everything that
touches vLLM or FastAPI (``plugin``, ``routes``, ...) is imported by vLLM's
plugin loader in the API server process only. Keep this ``__init__`` empty of
imports for that reason.
"""
