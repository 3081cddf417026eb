"""The wire format alone (no server): error bodies both ways, SSE framing,
request schemas."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from vllm_stateful.client._wire import SSEParser, completion_delta
from vllm_stateful.errors import (
    BudgetExceededError,
    ContextLengthError,
    InvalidInputError,
    SessionNotFoundError,
)
from vllm_stateful.server.errors import (
    ApiKeyError,
    error_body,
    error_from_body,
    invalid_input,
)
from vllm_stateful.server.schemas import (
    AppendRequest,
    SessionChatRequest,
    SessionCompletionRequest,
)


def test_error_round_trip():
    body = error_body(BudgetExceededError("budget is 3072 tokens"))
    assert body == {
        "error": {
            "message": "budget is 3072 tokens",
            "type": "rate_limit_error",
            "param": None,
            "code": "session_budget_exceeded",
        }
    }
    back = error_from_body(429, body)
    assert type(back) is BudgetExceededError and back.message == "budget is 3072 tokens"
    assert type(error_from_body(413, error_body(ContextLengthError("x")))) is ContextLengthError


def test_foreign_error_bodies_map_by_status():
    assert type(error_from_body(401, {"error": "Unauthorized"})) is ApiKeyError
    vllm_style = {
        "error": {"message": "bad", "type": "BadRequestError", "param": None, "code": 400}
    }
    err = error_from_body(400, vllm_style)
    assert type(err) is InvalidInputError and err.message == "bad"
    assert type(error_from_body(404, None)) is SessionNotFoundError
    odd = error_from_body(502, "gateway")
    assert odd.http_status == 502


def test_validation_errors_name_the_field():
    with pytest.raises(ValidationError) as exc:
        SessionCompletionRequest.model_validate({"prompt": "x", "temprature": 0})
    err = invalid_input(exc.value)
    assert err.message == "temprature: unknown field" and err.param == "temprature"
    with pytest.raises(ValidationError, match="'n' is not supported"):
        SessionCompletionRequest.model_validate({"prompt": "x", "n": 3})
    # Values that mean "not used" are accepted (clients send them by default).
    assert (
        SessionCompletionRequest.model_validate({"prompt": "x", "n": 1, "echo": False}).prompt
        == "x"
    )
    with pytest.raises(ValidationError, match="exactly one"):
        AppendRequest.model_validate({"text": "a", "token_ids": [1]})
    chat = SessionChatRequest.model_validate(
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
         "max_completion_tokens": 5}
    )  # fmt: skip
    assert chat.max_tokens == 5 and chat.messages[0].text() == "ab"


def test_sse_parser():
    p = SSEParser()
    lines = [": keep-alive", "", "event: ingested", 'data: {"v": 1}', "", "data: [DONE]", ""]
    assert [m for line in lines if (m := p.feed(line))] == [
        ("ingested", '{"v": 1}'),
        ("message", "[DONE]"),
    ]
    assert completion_delta('{"choices": [{"text": "hi"}]}') == "hi"
    assert completion_delta("[DONE]") is None
    with pytest.raises(ContextLengthError, match="too long"):
        completion_delta('{"error": {"message": "too long", "code": "context_length_exceeded"}}')


async def test_clients_drop_idle_connections_before_the_server_does():
    """vLLM's server closes a connection idle for VLLM_HTTP_TIMEOUT_KEEP_ALIVE
    seconds; httpx's default expiry is the same 5 s, so a request could go
    out on a connection the server was closing (a ReadError). Both clients'
    pools expire idle connections sooner."""
    from vllm import envs

    from vllm_stateful.client import AsyncClient, Client, connection_limits

    assert connection_limits().keepalive_expiry < envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE
    with Client("http://127.0.0.1:9") as sync_client:
        pool = sync_client._http._transport._pool
        assert pool._keepalive_expiry == connection_limits().keepalive_expiry
    async with AsyncClient("http://127.0.0.1:9") as async_client:
        pool = async_client._http._transport._pool
        assert pool._keepalive_expiry == connection_limits().keepalive_expiry
