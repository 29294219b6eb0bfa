"""The real server (uvicorn on a free loopback port) through the official ``openai`` client: completions and chat,
streamed or not, 8 concurrent clients equal to their prompts run alone, a client leaving mid-stream, and bad
requests answered with the right 4xx and an OpenAI-style body while the server keeps serving."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from moeflow import LLM, SamplingParams  # noqa: E402
from moeflow.server import create_app  # noqa: E402

KEY = "sekrit"
PROMPTS = ["The quick brown fox", "import os\n", "def fib(n):", "The capital of", "print(", "x = [1, 2,",
           "hello world", "# a comment"]  # fmt: skip


class Served:
    """One uvicorn server in a thread over ``llm``; ``base`` is its URL."""

    def __init__(self, llm: LLM, **kwargs: Any):
        self.app = create_app(llm, api_key=KEY, **kwargs)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.base = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=f"{self.base}/v1", api_key=KEY, max_retries=0, timeout=120)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(60)


@pytest.fixture(scope="module")
def served(llm: LLM) -> Iterator[Served]:
    s = Served(llm, max_batch=4, prefill_chunk=4)
    yield s
    s.close()


@pytest.fixture(scope="module")
def served_chat(chat_llm: LLM) -> Iterator[Served]:
    s = Served(chat_llm, model_name="tiny-chat")
    yield s
    s.close()


def alone(llm: LLM, prompt: str | list[int], n: int) -> Any:
    """The prompt run alone (call only while the server is idle: the engine is not thread-safe)."""
    return llm.generate([prompt], SamplingParams(max_tokens=n, temperature=0.0))[0]


def test_completion_and_stream(served: Served, llm: LLM) -> None:
    want = alone(llm, PROMPTS[0], 12)
    r = served.client.completions.create(model="olmoe", prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text
    assert r.usage.completion_tokens == len(want.token_ids)
    assert r.usage.prompt_tokens == len(llm.tokenizer(PROMPTS[0])["input_ids"])
    chunks = list(served.client.completions.create(model="olmoe", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                                   stream=True))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_and_stream(served_chat: Served, chat_llm: LLM) -> None:
    messages = [{"role": "user", "content": "def fib(n):"}]
    text = chat_llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = alone(chat_llm, chat_llm.tokenizer(text, add_special_tokens=False)["input_ids"], 10)
    c = served_chat.client
    r = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    stream = c.chat.completions.create(model="tiny-chat", messages=messages, max_tokens=10, temperature=0,
                                       stream=True)  # fmt: skip
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == want.text


def test_eight_concurrent_clients_equal_their_prompts_run_alone(served: Served, llm: LLM) -> None:
    lengths = [6, 14, 9, 20, 3, 11, 16, 8]
    want = [alone(llm, p, n).text for p, n in zip(PROMPTS, lengths)]

    def ask(i: int) -> str:
        kw = dict(model="olmoe", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in served.client.completions.create(**kw, stream=True))
        return served.client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(8) as pool:  # 8 clients, 4 rows: some join a batch already decoding
        assert list(pool.map(ask, range(8))) == want


def wait_idle(served: Served) -> None:
    engine = served.app.state.engine
    deadline = time.monotonic() + 10
    while engine.running or engine.waiting:
        assert time.monotonic() < deadline, "the server did not free the row"
        time.sleep(0.01)


def test_client_disconnect_mid_stream_frees_the_row(served: Served, llm: LLM) -> None:
    engine = served.app.state.engine
    stream = served.client.completions.create(model="olmoe", prompt=PROMPTS[2], max_tokens=200, temperature=0,
                                              extra_body={"ignore_eos": True}, stream=True)  # fmt: skip
    for _ in range(3):
        next(iter(stream))
    assert engine.running == 1
    stream.close()  # the client goes away
    wait_idle(served)
    assert engine.engine.kv.free == 4
    want = alone(llm, PROMPTS[3], 5).text
    assert served.client.completions.create(model="olmoe", prompt=PROMPTS[3], max_tokens=5,
                                            temperature=0).choices[0].text == want  # fmt: skip


def still_serving(served: Served) -> None:
    r = served.client.completions.create(model="olmoe", prompt="x", max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1


def error_body(r: httpx.Response) -> dict:
    body = r.json()["error"]
    assert set(body) >= {"message", "type", "param", "code"}
    return body


def test_bad_requests_get_4xx_and_the_server_keeps_serving(served: Served, llm: LLM) -> None:
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{served.base}/v1/completions"
    r = httpx.post(
        url, content=b'{"prompt": "x", "max_tok', headers={**auth, "content-type": "application/json"}
    )
    assert r.status_code == 400 and "malformed JSON" in error_body(r)["message"]
    r = httpx.post(url, json={"max_tokens": 3}, headers=auth)
    assert r.status_code == 400 and "prompt" in error_body(r)["message"]
    r = httpx.post(f"{served.base}/v1/chat/completions", json={"model": "olmoe"}, headers=auth)
    assert r.status_code == 400 and "messages" in error_body(r)["message"]
    still_serving(served)
    with pytest.raises(openai.NotFoundError) as err:
        served.client.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.status_code == 404 and err.value.body["code"] == "model_not_found"
    limit = llm.loaded.config.max_position_embeddings
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            served.client.completions.create(
                model="olmoe", prompt=[5] * (limit + 1), max_tokens=2, stream=stream
            )
        assert str(limit) in err.value.body["message"]
    wrong = openai.OpenAI(base_url=f"{served.base}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        wrong.completions.create(model="olmoe", prompt="x", max_tokens=2)
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"
    still_serving(served)
    assert httpx.get(f"{served.base}/health").json()["status"] == "ok"


def generated_tokens(served: Served) -> float:
    text = httpx.get(f"{served.base}/metrics").text
    return float(re.search(r"^moeflow_generated_tokens_total (\S+)$", text, re.M).group(1))


def test_client_gone_before_a_non_streamed_answer_frees_the_row(served: Served) -> None:
    engine = served.app.state.engine
    before = generated_tokens(served)
    body = {"prompt": PROMPTS[1], "max_tokens": 200, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes its connection
        httpx.post(f"{served.base}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(10, read=0.05))  # fmt: skip
    wait_idle(served)
    assert engine.engine.kv.free == 4
    time.sleep(0.5)
    assert generated_tokens(served) == before  # the request was ended, not run to its 200 tokens and answered
    still_serving(served)
