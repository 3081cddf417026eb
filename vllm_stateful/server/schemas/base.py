"""What every body of the session API shares: the strict and open model
bases, bounded integers, the token header, session ids and the error body."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

Consistency = Literal["ingested", "latest", "available"]

# Integers the engine receives: vLLM sends requests to its engine core as
# msgpack, which cannot carry integers outside 64 bits (the encoder raises,
# which would be a 500); vLLM's own server bounds ``seed`` the same way.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]

# Header that carries a session's access token on every session route.
TOKEN_HEADER = "X-Session-Token"
# Ids a client may choose: letters, digits and ``_ . : @ ~ -``.
SESSION_ID_PATTERN = r"^[A-Za-z0-9_.:@~-]+$"


class Strict(BaseModel):
    # Request bodies: a misspelt field is a 400 naming it. No Infinity/NaN
    # (Python's JSON parser accepts them): an infinite ttl_s made the
    # session's stats unserializable.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Open(BaseModel):
    # Response bodies: a newer server may add fields; older clients must
    # still parse.
    model_config = ConfigDict(extra="allow")


class ErrorInfo(Open):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(Open):
    error: ErrorInfo
