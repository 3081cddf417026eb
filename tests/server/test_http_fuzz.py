"""Property-based fuzzing of the session routes with schemathesis, from the
server's own OpenAPI schema (``/openapi.json``, restricted to
``/v1/sessions...``), against the shared server on 127.0.0.1: valid and
invalid requests alike never get a 5xx, and a reference session (whose
token the fuzzer never sees) answers token-for-token as before.

Half the generated cases name a live target session and carry its token, so
the handlers behind authorization are reached, not only the 401/404 paths.
Answers are kept short (``max_tokens`` at most 4) to fit the suite's time
budget. The event stream route is left out: with a live session it never
ends by design.
"""

from __future__ import annotations

import collections
import time

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from .conftest import Opened, Server

# Cases per (operation, generation mode): 10 operations x 2 modes.
EXAMPLES = 100
MAX_TOKENS = 4
ASK = {"prompt": " then", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
       "return_token_ids": True}  # fmt: skip


def _answer(http: httpx.Client, s: Opened) -> list[int]:
    r = http.post(f"/v1/sessions/{s.id}/completions", json=ASK, headers=s.headers)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def _session_schema(http: httpx.Client):
    raw = http.get("/openapi.json")
    assert raw.status_code == 200, raw.text
    doc = raw.json()
    doc["paths"] = {
        path: ops for path, ops in doc["paths"].items()
        if path.startswith("/v1/sessions") and not path.endswith("/events")
    }  # fmt: skip
    return schemathesis.openapi.from_dict(doc)


def _shorten(path: str, body: object) -> None:
    """Short answers: at most MAX_TOKENS generated tokens per question."""
    if not isinstance(body, dict):
        return
    asks = path.endswith("/completions")  # the default would be the rest of the context
    for key in ("max_tokens", "max_completion_tokens", "min_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > MAX_TOKENS:
            body[key] = MAX_TOKENS
        elif asks and key == "max_tokens" and not isinstance(value, int):
            body[key] = MAX_TOKENS


def test_fuzz_session_routes(server: Server, http: httpx.Client, open_session):
    ref = open_session("A reference session that the fuzzer never sees.")
    expected = _answer(http, ref)
    schema = _session_schema(http)
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = sorted(f"{op.method.upper()} {op.path}" for op in operations)
    assert len(labels) == 10, labels

    auth = {"Authorization": f"Bearer {server.api_key}"}
    target: list[Opened] = []
    created: list[Opened] = []  # sessions the fuzzer's creates opened
    statuses: collections.Counter = collections.Counter()
    succeeded: collections.Counter = collections.Counter()  # 2xx per operation
    server_errors: list[str] = []

    def live_target() -> Opened:
        if target:
            probe = http.get(f"/v1/sessions/{target[0].id}", headers=target[0].headers)
            if probe.status_code == 200:
                return target[0]
            target.clear()
        target.append(open_session("fuzz target: 1 2 3"))
        return target[0]

    def run(case, aim: bool) -> None:
        if aim and "session_id" in (case.path_parameters or {}):
            t = live_target()
            case.path_parameters["session_id"] = t.id
            case.headers = {**(case.headers or {}), **t.headers}
        _shorten(case.path, case.body)
        response = case.call(base_url=server.base_url, headers=auth, timeout=60)
        statuses[response.status_code] += 1
        if response.status_code < 300:
            succeeded[f"{case.method.upper()} {case.path}"] += 1
        if case.method.upper() == "POST" and case.path == "/v1/sessions" and response.status_code == 201:
            created.append(Opened(response.json()["id"], response.json()["token"]))
        if response.status_code >= 500:
            server_errors.append(
                f"{case.method.upper()} {case.formatted_path} -> {response.status_code}: "
                f"{response.text[:300]}\n  body={case.body!r} headers={case.headers!r}"
            )

    start = time.monotonic()
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                suppress_health_check=list(HealthCheck),
            )  # fmt: skip
            @given(case=op.as_strategy(generation_mode=mode), aim=st.booleans())
            def fuzz(case, aim):
                run(case, aim)

            fuzz()
    elapsed = time.monotonic() - start

    for s in created:
        http.delete(f"/v1/sessions/{s.id}", headers=s.headers)  # 404 if a case closed it
    total = sum(statuses.values())
    assert not server_errors, "\n".join(server_errors)
    assert total == len(operations) * 2 * EXAMPLES, (total, statuses)
    # Valid requests got through to the engine on every route (a random
    # flash id never names a registered flash query, so its DELETE is 400).
    assert set(succeeded) == set(labels) - {"DELETE /v1/sessions/{session_id}/flash/{flash_id}"}, (
        succeeded
    )
    print(f"\nfuzz: {total} cases in {elapsed:.1f} s: {dict(sorted(statuses.items()))}; "
          f"2xx per route: {dict(succeeded)}")

    # The reference session is untouched and answers exactly as before.
    assert _answer(http, ref) == expected
    info = http.get(f"/v1/sessions/{ref.id}", headers=ref.headers).json()
    assert (info["version"], info["pending"]) == (0, 0)
    if target:
        http.delete(f"/v1/sessions/{target[0].id}", headers=target[0].headers)
    check = http.get("/v1/stateful/reconcile").json()
    assert check["agree"], check
    assert (check["open_sessions"], check["ending_sessions"]) == (1, 0), check


def test_integers_past_64_bits_are_refused(http: httpx.Client, open_session):
    """Found by the fuzzer: an integer sampling field past 64 bits (here
    ``top_k``) passed validation and made vLLM's msgpack encoder raise on the
    way to the engine core: a 500. Now each is a 400 naming the field, and the
    session still answers."""
    s = open_session("integers")
    url = f"/v1/sessions/{s.id}"
    huge = 42832880612905351125340782592
    for field, value in (("top_k", huge), ("seed", huge), ("seed", -huge),
                         ("stop_token_ids", [huge]), ("min_tokens", 2**64), ("max_tokens", 2**64)):  # fmt: skip
        for route in ("/completions", "/chat/completions", "/flash"):
            body = ({"messages": [{"role": "user", "content": "hi"}]} if route.startswith("/chat")
                    else {"prompt": " hi"})  # fmt: skip
            body = {"max_tokens": 4, "temperature": 0, **body, field: value}
            r = http.post(url + route, json=body, headers=s.headers)
            assert r.status_code == 400, (field, route, r.status_code, r.text)
            assert r.json()["error"]["param"] in (field, f"{field}.0"), r.text
    r = http.post(url + "/completions", json={"prompt": " hi", "max_tokens": 4, "seed": 2**63 - 1,
                                                "top_k": 2**40}, headers=s.headers)  # fmt: skip
    assert r.status_code == 200, r.text


def test_infinity_and_nan_are_refused(http: httpx.Client, open_session):
    """Python's JSON parser takes ``Infinity`` and ``NaN``: an infinite
    ``ttl_s`` made a session whose stats could not be written as JSON."""
    for raw in ('{"ttl_s": Infinity}', '{"ttl_s": NaN}'):
        r = http.post("/v1/sessions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "ttl_s", r.text
    s = open_session("finite")
    raw = '{"prompt": " hi", "max_tokens": 4, "temperature": Infinity}'
    r = http.post(f"/v1/sessions/{s.id}/completions", content=raw, headers=s.headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature", r.text
    assert http.get(f"/v1/sessions/{s.id}", headers=s.headers).status_code == 200
