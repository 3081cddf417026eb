"""Bad input: a typed error, and the session stays intact and usable."""

from __future__ import annotations

import pytest

from conftest import MAX_MODEL_LEN
from helpers import greedy, reference
from vllm_stateful import (
    ContextLengthError,
    InvalidInputError,
    SessionClosedError,
    SessionExistsError,
    SessionNotFoundError,
)

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_errors_leave_session_intact(engine, stock):
    session = await engine.create_session([6] * 70, session_id="errors")
    tokens, version = list(session.tokens), session.version

    bad_calls = [
        (SessionNotFoundError, engine.append("nope", [1])),
        (SessionNotFoundError, engine.query("nope", [1])),
        (SessionExistsError, engine.create_session("", session_id="errors")),
        (InvalidInputError, engine.append(session.id, "")),
        (InvalidInputError, engine.append(session.id, [])),
        (InvalidInputError, engine.append(session.id, [-1])),
        (InvalidInputError, engine.append(session.id, [engine.vocab_size])),
        (InvalidInputError, engine.append(session.id, ["x"])),
        (InvalidInputError, engine.append(session.id, 3.5)),
        (InvalidInputError, engine.query(session.id, "")),
        (InvalidInputError, engine.query(session.id, [1], consistency="eventual")),
        (InvalidInputError, engine.create_session("", ttl_s=-1)),
        (ContextLengthError, engine.append(session.id, [7] * MAX_MODEL_LEN)),
        (ContextLengthError, engine.query(session.id, [7] * (MAX_MODEL_LEN - 70))),
        (ContextLengthError, engine.create_session([7] * MAX_MODEL_LEN)),
    ]
    for error, call in bad_calls:
        with pytest.raises(error) as info:
            await call
        assert info.value.message and info.value.http_status in (400, 404, 409, 413)
        assert session.tokens == tokens and session.version == version

    result = await engine.query(session.id, [1, 2], greedy())
    assert result.computed_tokens == 2
    assert result.token_ids == await reference(stock, tokens + [1, 2])
    await engine.append(session.id, [8] * 3)
    await engine.wait_ingested(session.id)
    assert session.tokens == tokens + [8] * 3

    await engine.close_session(session.id)
    for call in (engine.append("errors", [1]), engine.query("errors", [1])):
        with pytest.raises(SessionClosedError, match="closed"):
            await call
