"""The engine thread: waiting requests with equal settings run as one batch, /metrics moves, and a stream whose
client went away ends between steps."""

from __future__ import annotations

import asyncio
import re
import threading
import time

from moeflow.server.loop import EngineLoop, Finished, Job, Sink

OK = {"prompt": "def fib(n):", "max_tokens": 3, "temperature": 0}


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}" + (rf"\{{{re.escape(want)}\}}" if labels else "") + r" (\S+)$"
    found = re.search(pattern, text, re.M)
    return float(found.group(1)) if found else 0.0


def test_metrics_move(llm, serve):
    client = serve(llm)
    before = client.get("/metrics").text
    assert client.post("/v1/completions", json=OK).status_code == 200
    assert client.post("/v1/completions", json={**OK, "n": 2}).status_code == 400
    after = client.get("/metrics").text
    ok = dict(endpoint="/v1/completions", status="200")
    bad = dict(endpoint="/v1/completions", status="400")
    assert metric(after, "moeflow_requests_total", **ok) == metric(before, "moeflow_requests_total", **ok) + 1
    assert (
        metric(after, "moeflow_requests_total", **bad) == metric(before, "moeflow_requests_total", **bad) + 1
    )
    gen = metric(after, "moeflow_generated_tokens_total") - metric(before, "moeflow_generated_tokens_total")
    assert 1 <= gen <= 3
    assert metric(after, "moeflow_prompt_tokens_total") > metric(before, "moeflow_prompt_tokens_total")
    assert metric(after, "moeflow_time_to_first_token_seconds_count") == 1
    assert metric(after, "moeflow_expert_hits_total") + metric(after, "moeflow_expert_misses_total") > 0
    assert 0 <= metric(after, "moeflow_expert_hit_ratio") <= 1
    assert metric(after, "moeflow_bytes_to_device_total") > 0
    for name in (
        "moeflow_queue_length",
        "moeflow_running_batch_size",
        "moeflow_time_per_output_token_seconds_count",
    ):
        assert re.search(rf"^{name} ", after, re.M), name


def test_waiting_requests_with_equal_settings_batch(llm, serve, monkeypatch):
    client = serve(llm)
    engine = client.app.state.engine
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []
    generate = llm.generate

    def counted(prompts, params, *a, **kw):
        calls.append(len(prompts))
        if len(calls) == 1:
            entered.set()
            assert release.wait(30)
        return generate(prompts, params, *a, **kw)

    monkeypatch.setattr(llm, "generate", counted)
    prompts = ["def fib(n):", "The quick", "import os", "The capital", "print("]
    want = [generate([p], llm_params(3))[0].text for p in prompts]
    texts: dict[int, str] = {}

    def ask(i: int, body: dict) -> None:
        texts[i] = client.post("/v1/completions", json=body).json()["choices"][0]["text"]

    threads = [threading.Thread(target=ask, args=(0, {**OK, "prompt": prompts[0]}))]
    threads[0].start()
    assert entered.wait(30)
    for i, p in enumerate(prompts[1:4], 1):  # equal settings: one batch
        threads.append(threading.Thread(target=ask, args=(i, {**OK, "prompt": p})))
    threads.append(threading.Thread(target=ask, args=(4, {**OK, "prompt": prompts[4], "max_tokens": 2})))
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 30
    while engine.waiting < 4:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(30)
    assert sorted(calls) == [1, 1, 3]  # the held one, the three alike together, the one with other settings
    assert [texts[i] for i in range(4)] == want[:4]
    assert texts[4] == generate([prompts[4]], llm_params(2))[0].text


def llm_params(max_tokens: int):
    from moeflow import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0)


def test_cancelled_stream_ends_between_steps(llm):
    engine = EngineLoop(llm, max_queue=4, max_batch=4)
    engine.start()

    async def scenario() -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        long = Job(
            "def fib(n):", dict(max_tokens=200, temperature=0.0, ignore_eos=True), Sink(loop), stream=True
        )
        engine.submit(long)
        first = await long.sink.get()
        assert not isinstance(first, BaseException | Finished)
        long.cancelled.set()  # the client went away
        nxt = Job("import os", dict(max_tokens=2, temperature=0.0), Sink(loop))
        engine.submit(nxt)
        done = await asyncio.wait_for(nxt.sink.get(), 30)  # runs once the long stream has ended
        assert isinstance(done, Finished)
        late = []
        while not long.sink._queue.empty():
            late.append(long.sink._queue.get_nowait())
        assert not any(isinstance(item, Finished) for item in late), "the cancelled stream ran to its end"
        assert len(late) < 100
        return len(done.output.token_ids), done.output.text

    try:
        n, _ = asyncio.run(scenario())
        assert n <= 2
    finally:
        engine.stop()
