"""Flash queries over HTTP: registration, SSE push, cache hits, errors."""

from __future__ import annotations

import threading

import httpx

from vllm_stateful.client import BudgetExceededError, Client, InvalidInputError

from .conftest import Server

QUESTION = [40, 41, 42]


def stateless(http: httpx.Client, server: Server, prompt: list[int], max_tokens: int) -> list[int]:
    r = http.post("/v1/completions", json={
        "model": server.model, "prompt": prompt, "max_tokens": max_tokens,
        "temperature": 0, "return_token_ids": True,
    })  # fmt: skip
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def test_flash_push_hit_and_exactness(server: Server, http: httpx.Client):
    client = Client(server.base_url, api_key=server.api_key)
    prefix = [0] + [7] * 45
    s = client.create_session(prefix, flash=[{"prompt": QUESTION, "max_tokens": 6, "id": "last"}])
    events: list[dict] = []
    got = threading.Event()

    def listen() -> None:
        for ev in s.events():
            events.append(ev)
            if ev["type"] == "flash" and ev["version"] == 1:
                got.set()

    threading.Thread(target=listen, daemon=True).start()
    delta = [9] * 37
    assert s.append(delta) == 1
    assert got.wait(60), events
    flash = [e for e in events if e["type"] == "flash"]
    assert [e["version"] for e in flash] == sorted({e["version"] for e in flash})
    pushed = flash[-1]["data"]
    assert pushed["flash_id"] == "last" and 0 < pushed["confidence"] <= 1
    expected = stateless(http, server, prefix + delta + QUESTION, 6)
    assert pushed["token_ids"] == expected

    (info,) = s.list_flash()
    assert info.id == "last" and info.latest.version == 1 and info.latest.token_ids == expected
    hit = s.query(QUESTION, max_tokens=6, temperature=0, return_token_ids=True)
    assert hit.session.flash and hit.session.computed_tokens == 0 and hit.session.version == 1
    assert hit.session.computed_at == info.latest.computed_at
    assert hit.choices[0].token_ids == expected
    assert hit.choices[0].finish_reason == "length"
    # Different sampling fields: the normal path, O(|q|).
    miss = s.query(QUESTION, max_tokens=5, temperature=0, return_token_ids=True)
    assert not miss.session.flash and miss.session.computed_tokens == len(QUESTION)
    assert miss.choices[0].token_ids == expected[:5]
    s.close()


def test_flash_registration_errors_and_drop(server: Server, http: httpx.Client, open_session):
    s = open_session([0, 3, 4])
    url = f"/v1/sessions/{s.id}/flash"
    r = http.post(url, json={"prompt": "x", "temperature": 0.7}, headers=s.headers)
    assert r.status_code == 400 and "seed" in r.json()["error"]["message"]
    r = http.post(url, json={"prompt": ""}, headers=s.headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
    assert r.json()["error"]["message"] == "prompt: prompt must not be empty"
    r = http.post(url, json={"prompt": "x", "temperature": 0.7, "seed": 3, "id": "a"}, headers=s.headers)
    assert r.status_code == 201 and r.json()["id"] == "a" and r.json()["seed"] == 3
    r = http.post(url, json={"prompt": "y", "id": "a"}, headers=s.headers)
    assert r.status_code == 400 and "already exists" in r.json()["error"]["message"]
    for i in range(15):
        assert http.post(url, json={"prompt": [5, i]}, headers=s.headers).status_code == 201
    r = http.post(url, json={"prompt": [6]}, headers=s.headers)
    assert r.status_code == 429 and "max 16" in r.json()["error"]["message"]
    assert len(http.get(url, headers=s.headers).json()["data"]) == 16
    r = http.delete(url + "/a", headers=s.headers)
    assert r.status_code == 200 and r.json()["deleted"] is True
    assert http.delete(url + "/a", headers=s.headers).status_code == 400
    assert len(http.get(url, headers=s.headers).json()["data"]) == 15

    client = Client(server.base_url, api_key=server.api_key)
    for bad in ({"prompt": "x", "temperature": 2.0}, {"prompt": "x", "bogus": 1}):
        try:
            client.create_session("", flash=[bad])
        except InvalidInputError:
            pass
        else:
            raise AssertionError(f"accepted {bad}")
    try:
        client.create_session("", flash=[{"prompt": [i]} for i in range(2, 19)])
    except BudgetExceededError as exc:
        assert "flash" in str(exc)
    else:
        raise AssertionError("17 flash queries accepted")
