"""The engine thread: requests join a running batch between steps, /metrics moves, and a stream whose client went
away frees its row at once."""

from __future__ import annotations

import asyncio
import re
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
    assert 0 < metric(after, "moeflow_expert_slots_in_use") <= metric(after, "moeflow_expert_slots")
    for phase in ("admit", "decode", "prefill"):  # the 3-token request: one prefill, then two decode steps
        ran = metric(after, "moeflow_engine_phase_total", phase=phase) - metric(
            before, "moeflow_engine_phase_total", phase=phase
        )
        assert ran >= (1 if phase == "prefill" else 2), phase
        assert metric(after, "moeflow_engine_phase_seconds_total", phase=phase) > 0, phase
    prefilled = metric(after, "moeflow_engine_prefill_tokens_total") - metric(
        before, "moeflow_engine_prefill_tokens_total"
    )
    assert prefilled == metric(after, "moeflow_prompt_tokens_total") - metric(
        before, "moeflow_prompt_tokens_total"
    )
    for name in (
        "moeflow_queue_length",
        "moeflow_running_batch_size",
        "moeflow_time_per_output_token_seconds_count",
    ):
        assert re.search(rf"^{name} ", after, re.M), name


def test_a_request_joins_the_running_batch(llm):
    """A short request submitted while a long stream runs finishes first (it joined the batch between two
    steps instead of waiting for the batch to end), and both equal their prompts run alone."""
    engine = EngineLoop(llm, max_queue=4, max_batch=4)
    engine.start()
    long_params = dict(max_tokens=60, temperature=0.0, ignore_eos=True)

    async def scenario() -> tuple[list[str], Finished, Finished]:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        long = Job("def fib(n):", long_params, Sink(loop), stream=True)
        engine.submit(long)
        assert not isinstance(await long.sink.get(), BaseException | Finished)  # it is decoding
        short = Job("import os", dict(max_tokens=3, temperature=0.0, ignore_eos=True), Sink(loop))
        engine.submit(short)

        async def wait(job: Job, tag: str) -> Finished:
            while not isinstance(item := await asyncio.wait_for(job.sink.get(), 60), Finished):
                assert not isinstance(item, BaseException), item
            order.append(tag)
            return item

        a, b = await asyncio.gather(wait(long, "long"), wait(short, "short"))
        return order, a, b

    try:
        order, long_done, short_done = asyncio.run(scenario())
    finally:
        engine.stop()
    assert order == ["short", "long"]
    want = llm.generate(["def fib(n):", "import os"], [llm_params(60), llm_params(3)][0])
    assert long_done.output.token_ids == want[0].token_ids
    assert short_done.output.token_ids == llm.generate(["import os"], llm_params(3))[0].token_ids


def llm_params(max_tokens: int):
    from moeflow import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def test_cancelled_stream_frees_its_row_at_once(llm):
    engine = EngineLoop(llm, max_queue=4, max_batch=2)
    engine.start()
    rows = engine.engine.kv

    async def scenario() -> list:
        loop = asyncio.get_running_loop()
        long = Job(
            "def fib(n):", dict(max_tokens=200, temperature=0.0, ignore_eos=True), Sink(loop), stream=True
        )
        engine.submit(long)
        first = await long.sink.get()
        assert not isinstance(first, BaseException | Finished)
        assert rows.free == 1
        engine.cancel(long)  # the client went away
        deadline = time.monotonic() + 10
        while rows.free < 2:  # the row is back within a step or two, not at the end of 200 tokens
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        assert engine.running == 0
        late = []
        while not long.sink._queue.empty():
            late.append(long.sink._queue.get_nowait())
        return late

    try:
        late = asyncio.run(scenario())
    finally:
        engine.stop()
    assert not any(isinstance(item, Finished) for item in late), "the cancelled stream ran to its end"
    assert len(late) < 10
