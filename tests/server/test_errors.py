"""Bad requests get the right 4xx with an OpenAI-style error body, and the server keeps serving."""

from __future__ import annotations

import threading
import time

import pytest

OK = {"prompt": "def fib(n):", "max_tokens": 2, "temperature": 0}


def error_of(r) -> str:
    body = r.json()
    assert set(body["error"]) >= {"message", "type", "code"}, body
    return body["error"]["message"]


def still_serving(client) -> None:
    r = client.post("/v1/completions", json=OK)
    assert r.status_code == 200, r.text


def test_api_key(llm, serve):
    client = serve(llm, api_key="sekrit")
    assert client.post("/v1/completions", json=OK).status_code == 401
    r = client.post("/v1/completions", json=OK, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and "API key" in error_of(r)
    assert r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models").status_code == 401
    good = {"Authorization": "Bearer sekrit"}
    assert client.post("/v1/completions", json=OK, headers=good).status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key


def test_prompt_longer_than_the_context(llm, serve):
    client = serve(llm)
    limit = llm.loaded.config.max_position_embeddings
    r = client.post("/v1/completions", json={**OK, "prompt": [5] * (limit + 10)})
    assert r.status_code == 400
    assert str(limit) in error_of(r)
    r = client.post("/v1/completions", json={**OK, "prompt": [5] * (limit + 10), "stream": True})
    assert r.status_code == 400 and str(limit) in error_of(r)  # refused before the stream starts
    still_serving(client)


@pytest.mark.parametrize(
    ("body", "status", "words"),
    [
        ({**OK, "n": 2}, 400, "n=2"),
        ({**OK, "max_tokens": "many"}, 400, "max_tokens"),
        ({**OK, "max_tokens": 0}, 400, "max_tokens"),
        ({**OK, "temperature": -1}, 400, "temperature"),
        ({**OK, "top_p": 0}, 400, "top_p"),
        ({**OK, "logprobs": 3}, 400, "logprobs"),
        ({**OK, "prompt": ""}, 400, "empty prompt"),
        ({**OK, "prompt": ["a", "b"]}, 400, "one prompt"),
        ({**OK, "prompt": [10**9]}, 400, "vocab"),
        ({"max_tokens": 2}, 400, "prompt: field required"),
        ({**OK, "prompt": 5}, 400, "prompt must be text, a list of token ids"),
        ({**OK, "model": "gpt-4"}, 404, "gpt-4"),
    ],
)
def test_bad_completion_requests(llm, serve, body, status, words):
    client = serve(llm)
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert words.lower() in error_of(r).lower()
    still_serving(client)


def test_malformed_json_and_unknown_route(llm, serve):
    client = serve(llm)
    r = client.post(
        "/v1/completions", content=b'{"prompt": "x",', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "malformed JSON" in error_of(r)
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400
    assert client.get("/v1/nothing").status_code == 404
    still_serving(client)


def test_full_queue_is_429_with_retry_after(llm, serve):
    client = serve(llm, max_queue=1, max_batch=1)
    engine = client.app.state.engine
    long = {**OK, "max_tokens": 200, "ignore_eos": True, "stream": True}
    results: list[int] = []
    with client.stream("POST", "/v1/completions", json=long) as stream:  # holds the only row
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(lines)
        waiter = threading.Thread(
            target=lambda: results.append(client.post("/v1/completions", json=OK).status_code)
        )
        waiter.start()
        deadline = time.monotonic() + 30
        while engine.waiting < 1:  # the second waits in the queue, which is now full
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = client.post("/v1/completions", json=OK)
        assert r.status_code == 429
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "rate_limit_error"
    waiter.join(60)  # the stream's client went away: its row went to the waiting request
    assert results == [200]
    still_serving(client)
