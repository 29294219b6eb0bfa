"""/v1/completions and /v1/chat/completions against the engine run directly: same text, streamed or not."""

from __future__ import annotations

import pytest

from moeflow import SamplingParams
from tests.server.conftest import sse_events

PROMPT = "The capital of France is"


def greedy(**kw):
    return SamplingParams(max_tokens=kw.pop("max_tokens", 12), temperature=0.0, **kw)


def test_completion_equals_generate(llm, serve):
    client = serve(llm)
    want = llm.generate([PROMPT], greedy())[0]
    r = client.post(
        "/v1/completions", json={"model": "olmoe", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "olmoe"
    (choice,) = body["choices"]
    assert choice["text"] == want.text
    assert choice["finish_reason"] == {"eos": "stop"}.get(want.finish_reason, want.finish_reason)
    n_prompt = len(llm.tokenizer(PROMPT)["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": n_prompt,
        "completion_tokens": len(want.token_ids),
        "total_tokens": n_prompt + len(want.token_ids),
    }


def test_token_id_prompt_and_stop(llm, serve):
    client = serve(llm)
    ids = llm.tokenizer(PROMPT)["input_ids"]
    free = llm.generate([PROMPT], greedy(max_tokens=20, ignore_eos=True))[0].text
    stop = free[3:5]
    assert stop.strip(), f"the tiny model's text {free!r} has no usable stop string"
    want = llm.generate([PROMPT], greedy(max_tokens=20, ignore_eos=True, stop=(stop,)))[0]
    body = {"prompt": ids, "max_tokens": 20, "temperature": 0, "stop": [stop], "ignore_eos": True}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == want.text == free[: free.find(stop)]
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_stream_concatenates_to_the_whole_text(llm, serve):
    client = serve(llm)
    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) > 2 and all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_stream_usage_chunk(llm, serve):
    client = serve(llm)
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with client.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 5


def test_seeded_sampling_is_reproducible(llm, serve):
    client = serve(llm)
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.5, "top_p": 0.95, "top_k": 50, "seed": 7}
    a, b = (client.post("/v1/completions", json=body).json()["choices"][0]["text"] for _ in range(2))
    want = llm.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=1.5, top_p=0.95, top_k=50, seed=7)
    )
    assert a == b == want[0].text


def test_chat_uses_the_template(chat_llm, serve):
    client = serve(chat_llm, model_name="tiny-chat")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def fib(n):"}]
    tok = chat_llm.tokenizer
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("assistant:")
    want = chat_llm.generate([tok(text, add_special_tokens=False)["input_ids"]], greedy())[0]
    req = {"model": "tiny-chat", "messages": messages, "max_tokens": 12, "temperature": 0}
    r = client.post("/v1/chat/completions", json=req)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    with client.stream("POST", "/v1/chat/completions", json={**req, "stream": True}) as s:
        events = sse_events(list(s.iter_lines()))
    assert events[-1] == "[DONE]"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == want.text
    assert events[-2]["choices"][0]["finish_reason"] is not None


def test_chat_without_template_is_400(llm, serve):
    client = serve(llm)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400
    assert "no chat template" in r.json()["error"]["message"]


def test_models_and_health(llm, serve):
    client = serve(llm, model_name="tiny")
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["tiny"]
    assert client.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_requests_equal_alone(llm, serve, stream):
    """Several clients at once (batched or queued) get what each prompt gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    client = serve(llm)
    prompts = ["The quick brown fox", "import os\n", "def fib(n):", "The capital of"]
    want = [llm.generate([p], greedy(max_tokens=8))[0].text for p in prompts]

    def ask(prompt: str) -> str:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0}
        if not stream:
            return client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
            events = sse_events(list(r.iter_lines()))
        return "".join(e["choices"][0]["text"] for e in events[:-1])

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(ask, prompts)) == want
