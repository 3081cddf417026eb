"""OpenAPI of the session routes.

The handlers read and validate their bodies themselves (``server/http.py``),
so FastAPI cannot see what they accept; ``operation`` describes it for the
server's ``/openapi.json``: the JSON body (the pydantic model's schema, with
its definitions inlined so the fragment stands alone), the session token
header and the query parameters.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from vllm_stateful.server.schemas import TOKEN_HEADER


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return {**_inline(defs[ref[len("#/$defs/"):]], defs), **_inline(rest, defs)}
        return {k: _inline(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with every ``$defs`` reference inlined."""
    schema = model.model_json_schema()
    return _inline(schema, schema.get("$defs", {}))


def operation(
    body: type[BaseModel] | None = None,
    *,
    token: bool = True,
    query: dict[str, dict[str, Any]] | None = None,
    body_required: bool = True,
) -> dict[str, Any]:
    """``openapi_extra`` for a session route."""
    params: list[dict[str, Any]] = []
    if token:
        params.append({
            "name": TOKEN_HEADER, "in": "header", "required": True,
            "description": "the session's access token (returned when it was created)",
            "schema": {"type": "string"},
        })  # fmt: skip
    for name, schema in (query or {}).items():
        params.append({"name": name, "in": "query", "required": False, "schema": schema})
    extra: dict[str, Any] = {}
    if params:
        extra["parameters"] = params
    if body is not None:
        extra["requestBody"] = {
            "required": body_required,
            "content": {"application/json": {"schema": body_schema(body)}},
        }
    return extra
