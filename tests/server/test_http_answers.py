"""Session answers over HTTP equal stateless answers on the same tokens.

A session is a token log: the prefix tokenized with the model's special
tokens, then every append and the question tokenized without them. The
stateless reference is ``/v1/completions`` with that exact token list as
``prompt``; greedy, ``ignore_eos`` and float32 make them token-exact.
"""

from __future__ import annotations

import json

import httpx
import pytest
from openai import OpenAI

from .conftest import Server, tokenize

PREFIX = "09:30:00 1651.25 3\n"
APPENDS = ["09:30:01 1651.50 2\n", "09:30:02 1651.00 7\n", "The last price was"]
QUESTION = " What is the last price?"
GREEDY = {"temperature": 0.0, "max_tokens": 12}
# vLLM extensions, accepted by both the stock and the session handlers.
EXACT = {"ignore_eos": True, "return_token_ids": True}


@pytest.fixture
def openai_client(server: Server) -> OpenAI:
    return OpenAI(base_url=server.v1, api_key=server.api_key, max_retries=0)


@pytest.fixture
def market(http: httpx.Client, open_session):
    """A session holding PREFIX + APPENDS, all ingested, and its token ids."""
    s = open_session(PREFIX)
    for text in APPENDS:
        r = http.post(
            f"/v1/sessions/{s.id}/append",
            params={"wait": "true"},
            json={"text": text},
            headers=s.headers,
        )
        assert r.status_code == 200, r.text
    context = tokenize(http, PREFIX, special=True)
    for text in APPENDS:
        context += tokenize(http, text, special=False)
    return s, context


def _token_ids(obj) -> list[int]:
    return obj.model_dump()["choices"][0]["token_ids"]


def test_openai_client_session_query_equals_stateless(server, http, openai_client, market):
    s, context = market
    question = tokenize(http, QUESTION, special=False)

    answer = openai_client.completions.create(
        model=server.model, prompt=QUESTION, **GREEDY,
        extra_body={"session_id": s.id, **EXACT}, extra_headers=s.headers,
    )  # fmt: skip
    stateless = openai_client.completions.create(
        model=server.model, prompt=context + question, **GREEDY, extra_body=EXACT
    )

    assert len(_token_ids(answer)) == GREEDY["max_tokens"]
    assert _token_ids(answer) == _token_ids(stateless)
    assert answer.choices[0].text == stateless.choices[0].text
    extra = answer.model_dump()
    # The session served everything but the question from its pinned KV.
    assert extra["session"]["computed_tokens"] == len(question)
    assert extra["session"]["version"] == len(APPENDS)
    assert extra["session"]["flash"] is False
    assert (
        answer.usage.prompt_tokens == len(context) + len(question) == stateless.usage.prompt_tokens
    )
    assert answer.usage.prompt_tokens_details.cached_tokens == len(context)
    assert answer.usage.completion_tokens == GREEDY["max_tokens"]


def test_session_route_and_token_prompt(http, market):
    """``/v1/sessions/{id}/completions`` takes the question as text or ids."""
    s, context = market
    question = tokenize(http, QUESTION, special=False)
    by_text = http.post(f"/v1/sessions/{s.id}/completions", headers=s.headers,
                        json={"prompt": QUESTION, **GREEDY, **EXACT})  # fmt: skip
    by_ids = http.post(f"/v1/sessions/{s.id}/completions", headers=s.headers,
                       json={"prompt": question, **GREEDY, **EXACT})  # fmt: skip
    assert by_text.status_code == by_ids.status_code == 200, by_text.text
    a, b = by_text.json(), by_ids.json()
    assert a["object"] == "text_completion"
    assert a["choices"][0]["token_ids"] == b["choices"][0]["token_ids"]
    assert a["session"]["computed_tokens"] == b["session"]["computed_tokens"] == len(question)
    # A query does not change the session.
    stats = http.get(f"/v1/sessions/{s.id}", headers=s.headers).json()
    assert (stats["version"], stats["tokens"]) == (len(APPENDS), len(context))


def test_streaming_concatenates_to_the_answer(server, http, openai_client, market):
    s, _ = market
    whole = openai_client.completions.create(
        model=server.model, prompt=QUESTION, **GREEDY,
        extra_body={"session_id": s.id, **EXACT}, extra_headers=s.headers,
    )  # fmt: skip
    chunks = list(openai_client.completions.create(
        model=server.model, prompt=QUESTION, **GREEDY, stream=True,
        stream_options={"include_usage": True},
        extra_body={"session_id": s.id, **EXACT}, extra_headers=s.headers,
    ))  # fmt: skip
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert sum((_token_ids(c) for c in text_chunks), []) == _token_ids(whole)
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage.completion_tokens == GREEDY["max_tokens"]
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens

    # On the wire: OpenAI's framing, ending with [DONE].
    with http.stream("POST", f"/v1/sessions/{s.id}/completions", headers=s.headers,
                     json={"prompt": QUESTION, **GREEDY, "stream": True}) as r:  # fmt: skip
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    assert all(ln.startswith("data: ") for ln in lines)
    first = json.loads(lines[0][6:])
    assert first["object"] == "text_completion" and first["session"]["id"] == s.id


def test_chat_with_session(server, http, openai_client, market):
    """Chat: the model sees the session's tokens, then the ChatML rendering
    of the messages with the generation prompt (tokenized without special
    tokens)."""
    s, context = market
    messages = [{"role": "user", "content": "What is the last price?"}]
    rendered = "<|im_start|>user\nWhat is the last price?<|im_end|>\n<|im_start|>assistant\n"
    question = tokenize(http, rendered, special=False)

    chat = openai_client.chat.completions.create(
        model=server.model, messages=messages, **GREEDY,
        extra_body={"session_id": s.id, **EXACT}, extra_headers=s.headers,
    )  # fmt: skip
    stateless = openai_client.completions.create(
        model=server.model, prompt=context + question, **GREEDY, extra_body=EXACT
    )
    assert chat.object == "chat.completion"
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == stateless.choices[0].text
    assert _token_ids(chat) == _token_ids(stateless)
    assert chat.model_dump()["session"]["computed_tokens"] == len(question)

    deltas = list(openai_client.chat.completions.create(
        model=server.model, messages=messages, **GREEDY, stream=True,
        extra_body={"session_id": s.id, **EXACT}, extra_headers=s.headers,
    ))  # fmt: skip
    assert deltas[0].choices[0].delta.role == "assistant"
    assert (
        "".join(d.choices[0].delta.content or "" for d in deltas) == chat.choices[0].message.content
    )


def test_commit_appends_question_and_answer(http, market):
    s, context = market
    question = tokenize(http, QUESTION, special=False)
    r = http.post(f"/v1/sessions/{s.id}/completions", headers=s.headers,
                  json={"prompt": QUESTION, **GREEDY, **EXACT, "commit": True})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["session"]["version"] == len(APPENDS)
    assert body["session"]["committed_version"] == len(APPENDS) + 1
    stats = http.get(f"/v1/sessions/{s.id}", headers=s.headers).json()
    answer = body["choices"][0]["token_ids"]
    assert stats["version"] == len(APPENDS) + 1
    assert stats["tokens"] == len(context) + len(question) + len(answer)


def test_consistency_latest_sees_the_newest_append(http, open_session):
    s = open_session([0, 5, 6, 7])
    r = http.post(f"/v1/sessions/{s.id}/append", json={"token_ids": [8] * 40}, headers=s.headers)
    assert r.status_code == 202 and r.json()["version"] == 1
    r = http.post(f"/v1/sessions/{s.id}/completions", headers=s.headers,
                  json={"prompt": [9], "max_tokens": 2, "consistency": "latest"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["session"]["version"] == 1
    assert r.json()["usage"]["prompt_tokens"] == 4 + 40 + 1


def test_stateless_traffic_is_unchanged(server, http, openai_client):
    """Without session_id the stock vLLM handlers answer, in their format."""
    out = openai_client.completions.create(
        model=server.model, prompt="Hello", max_tokens=4, temperature=0
    )
    assert out.object == "text_completion" and out.usage.completion_tokens == 4
    assert "session" not in out.model_dump()
    assert out.system_fingerprint and out.system_fingerprint.startswith("vllm")
    chat = openai_client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
    )
    assert chat.object == "chat.completion" and chat.usage.completion_tokens == 3
    chunks = list(openai_client.completions.create(
        model=server.model, prompt="Hello", max_tokens=4, temperature=0, stream=True
    ))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == out.choices[0].text
    # The stock handler's own validation, in vLLM's own format.
    r = http.post("/v1/completions", json={"model": server.model, "prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and isinstance(r.json()["error"]["code"], int)


def test_routes_are_in_the_openapi_schema(http):
    paths = http.get("/openapi.json").json()["paths"]
    for path in ("/v1/sessions", "/v1/sessions/{session_id}", "/v1/sessions/{session_id}/append",
                 "/v1/sessions/{session_id}/completions", "/v1/sessions/{session_id}/events"):  # fmt: skip
        assert path in paths
    assert "post" in paths["/v1/completions"] and "post" in paths["/v1/chat/completions"]
