"""Every error: its status, an OpenAI-format body, and nothing changed.

After each rejected request the session has the same tokens and version and
still answers.
"""

from __future__ import annotations

import httpx

from .conftest import BUDGET_TOKENS, MAX_MODEL_LEN, Opened, Server

VOCAB = 512  # the tiny model's


def _assert_error(r: httpx.Response, status: int, code: str) -> dict:
    where = f"{r.request.method} {r.request.url.path}: {r.text[:300]}"
    assert r.status_code == status, where
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, where
    assert err["code"] == code and err["message"] and isinstance(err["type"], str), where
    return err


def _snapshot(http: httpx.Client, s: Opened) -> tuple[int, int]:
    stats = http.get(f"/v1/sessions/{s.id}", headers=s.headers).json()
    return stats["tokens"], stats["version"]


def _still_answers(http: httpx.Client, s: Opened) -> None:
    r = http.post(
        f"/v1/sessions/{s.id}/completions", headers=s.headers, json={"prompt": [5], "max_tokens": 2}
    )
    assert r.status_code == 200, r.text


def _cases(server: Server, s: Opened, other: Opened):
    """(method, path, json body or raw bytes, headers, status, code)."""
    base = f"/v1/sessions/{s.id}"
    h = s.headers
    q = {"prompt": "hi", "max_tokens": 2}
    # fmt: off
    return [
        # 400: malformed or unsupported
        ("POST", f"{base}/append", b"{not json", h, 400, "invalid_request"),
        ("POST", f"{base}/append", b"[1, 2]", h, 400, "invalid_request"),
        ("POST", f"{base}/append", {}, h, 400, "invalid_request"),
        ("POST", f"{base}/append", {"text": "a", "token_ids": [1]}, h, 400, "invalid_request"),
        ("POST", f"{base}/append", {"text": ""}, h, 400, "invalid_request"),
        ("POST", f"{base}/append", {"token_ids": []}, h, 400, "invalid_request"),
        ("POST", f"{base}/append", {"token_ids": [VOCAB]}, h, 400, "invalid_request"),
        ("POST", f"{base}/append", {"token_ids": [-1]}, h, 400, "invalid_request"),
        ("POST", f"{base}/append", {"token_ids": ["a"]}, h, 400, "invalid_request"),
        ("POST", f"{base}/append?wait=maybe", {"text": "a"}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "bogus": 1}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {"max_tokens": 2}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "prompt": ""}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "prompt": [VOCAB]}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "temperature": -1}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "top_k": -5}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "n": 2}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "logprobs": 2}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "consistency": "eventual"}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "commit": True, "stream": True}, h, 400, "invalid_request"),
        ("POST", f"{base}/completions", {**q, "session_id": other.id}, h, 400, "invalid_request"),
        ("POST", "/v1/completions", {**q, "session_id": 7}, h, 400, "invalid_request"),
        ("POST", "/v1/chat/completions", {"session_id": s.id, "messages": []}, h, 400, "invalid_request"),
        ("POST", "/v1/sessions", {"prefix": "x", "ttl_s": -1}, {}, 400, "invalid_request"),
        ("POST", "/v1/sessions", {"prefix": [VOCAB]}, {}, 400, "invalid_request"),
        ("POST", "/v1/sessions", {"session_id": ""}, {}, 400, "invalid_request"),
        ("POST", "/v1/sessions", {"session_id": "a/b"}, {}, 400, "invalid_request"),
        # 401 / 403: credentials
        ("GET", base, None, {}, 401, "session_token_required"),
        ("POST", f"{base}/append", {"text": "a"}, {}, 401, "session_token_required"),
        ("POST", "/v1/completions", {**q, "session_id": s.id}, {}, 401, "session_token_required"),
        ("GET", "/v1/sessions", None, {}, 401, "session_token_required"),
        ("POST", f"{base}/append", {"text": "a"}, {"X-Session-Token": "wrong"}, 403, "forbidden"),
        # 404: unknown session or model
        ("GET", "/v1/sessions/nope", None, h, 404, "session_not_found"),
        ("POST", "/v1/sessions/nope/append", {"text": "a"}, h, 404, "session_not_found"),
        ("POST", "/v1/completions", {**q, "session_id": "nope"}, h, 404, "session_not_found"),
        ("POST", "/v1/completions", {**q, "session_id": s.id, "model": "nope"}, h, 404, "model_not_found"),
        # 409: id taken
        ("POST", "/v1/sessions", {"session_id": s.id}, {}, 409, "session_exists"),
        # 413: past the context window
        ("POST", f"{base}/append", {"token_ids": [5] * MAX_MODEL_LEN}, h, 413, "context_length_exceeded"),
        ("POST", f"{base}/completions", {**q, "prompt": [5] * MAX_MODEL_LEN}, h, 413, "context_length_exceeded"),
        ("POST", "/v1/sessions", {"prefix": [5] * (MAX_MODEL_LEN + 1)}, {}, 413, "context_length_exceeded"),
        # 429: past the session budget (the window still has room)
        ("POST", f"{base}/append", {"token_ids": [5] * (BUDGET_TOKENS + 64)}, h, 429, "session_budget_exceeded"),
        ("POST", "/v1/sessions", {"prefix": [5] * (BUDGET_TOKENS + 64)}, {}, 429, "session_budget_exceeded"),
    ]
    # fmt: on


def test_errors_have_status_and_openai_body_and_change_nothing(server, http, open_session):
    s = open_session("The quick brown fox", session_id="errors-main")
    other = open_session("other")
    before = _snapshot(http, s)
    sessions_before = {x.id for x in [s, other]}
    for method, path, body, headers, status, code in _cases(server, s, other):
        kw = (
            {"content": body, "headers": {**headers, "content-type": "application/json"}}
            if isinstance(body, bytes)
            else {"json": body, "headers": headers}
        )
        r = http.request(method, path, **kw)
        _assert_error(r, status, code)
        assert _snapshot(http, s) == before, (method, path, status)
    listed = http.get(
        "/v1/sessions", headers={"X-Session-Token": f"{s.token},{other.token}"}
    ).json()
    assert {x["id"] for x in listed["data"]} == sessions_before
    _still_answers(http, s)


def test_budget_message_names_the_limit(http, open_session):
    s = open_session([5] * 1000)
    r = http.post(f"/v1/sessions/{s.id}/append", json={"token_ids": [6] * 2500}, headers=s.headers)
    err = _assert_error(r, 429, "session_budget_exceeded")
    assert f"budget is {BUDGET_TOKENS} tokens" in err["message"]
    assert _snapshot(http, s) == (1000, 0)
    _still_answers(http, s)


def test_other_sessions_token_is_refused_on_every_route(http, open_session):
    a = open_session("session a")
    b = open_session("session b")
    wrong = b.headers
    base = f"/v1/sessions/{a.id}"
    routes = [
        ("GET", base, None),
        ("POST", f"{base}/append", {"text": "x"}),
        ("POST", f"{base}/append?wait=true", {"text": "x"}),
        ("POST", f"{base}/completions", {"prompt": "x"}),
        ("POST", f"{base}/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("GET", f"{base}/events", None),
        ("POST", f"{base}/flash", {"prompt": "x"}),
        ("GET", f"{base}/flash", None),
        ("DELETE", f"{base}/flash/any", None),
        ("DELETE", base, None),
        ("POST", "/v1/completions", {"session_id": a.id, "prompt": "x"}),
        (
            "POST",
            "/v1/chat/completions",
            {"session_id": a.id, "messages": [{"role": "user", "content": "x"}]},
        ),
    ]
    before = _snapshot(http, a)
    for method, path, body in routes:
        r = http.request(method, path, json=body, headers=wrong)
        _assert_error(r, 403, "forbidden")
    assert _snapshot(http, a) == before
    # Listing with b's token shows b only.
    listed = http.get("/v1/sessions", headers=wrong).json()["data"]
    assert [x["id"] for x in listed] == [b.id]
    _still_answers(http, a)


def test_api_key_guards_session_routes(server: Server, open_session):
    s = open_session("guarded")
    with httpx.Client(base_url=server.base_url, timeout=30) as anon:
        for method, path in [
            ("POST", "/v1/sessions"),
            ("GET", "/v1/sessions"),
            ("GET", f"/v1/sessions/{s.id}"),
            ("POST", f"/v1/sessions/{s.id}/append"),
            ("POST", f"/v1/sessions/{s.id}/completions"),
            ("GET", f"/v1/sessions/{s.id}/events"),
            ("DELETE", f"/v1/sessions/{s.id}"),
            ("POST", "/v1/completions"),
        ]:
            r = anon.request(
                method, path, json={"prompt": "x", "session_id": s.id}, headers=s.headers
            )
            assert r.status_code == 401, (method, path, r.text)


def test_closed_session_is_gone(http, open_session):
    s = open_session("short-lived", session_id="closing")
    r = http.delete(f"/v1/sessions/{s.id}", headers=s.headers)
    assert r.status_code == 200 and r.json() == {
        "id": s.id,
        "object": "session.deleted",
        "deleted": True,
    }
    _assert_error(http.get(f"/v1/sessions/{s.id}", headers=s.headers), 404, "session_not_found")
    # The id can be taken again, and the old token does not open the new one.
    t = open_session("again", session_id="closing")
    _assert_error(http.get(f"/v1/sessions/{t.id}", headers=s.headers), 403, "forbidden")
