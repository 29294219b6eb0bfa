"""The server's startup on the static decode path (the real server, uvicorn on a loopback port): the decode bucket is
sized once for ``max_model_len`` so requests of every length share it (no bucket growth while serving), a request
longer than ``max_model_len`` is a 400 with an OpenAI-style body, and the warm-up request runs once before the server
listens (not with ``warmup=False``)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("uvicorn")

from moeflow import LLM, SamplingParams  # noqa: E402
from moeflow.engine.static import MIN_LEN  # noqa: E402
from moeflow.engine.static_rows import StaticRows  # noqa: E402
from tests.server.test_loop import metric  # noqa: E402
from tests.server.test_openai_client import KEY, Served  # noqa: E402

CONTEXT = 2048


@pytest.fixture(scope="module")
def long_llm(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[LLM]:
    """The tiny OLMoE with a context of 2048 positions, decoding on the static path (rows of one static bucket)."""
    path = tmp_path_factory.mktemp("long") / "olmoe"
    shutil.copytree(checkpoints["olmoe"], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["max_position_embeddings"] = CONTEXT
    (path / "config.json").write_text(json.dumps(cfg))
    with LLM(path, device="cpu", progress=False, batch_size=4, decode="static") as engine:
        assert engine.static is not None
        yield engine


def row_buckets(llm: LLM) -> set:
    assert llm.static is not None
    return {key for key in llm.static._buckets if len(key) == 3}


def rows_of(served: Served) -> StaticRows:
    kv = served.app.state.engine.engine.kv
    assert isinstance(kv, StaticRows)
    return kv


@pytest.fixture(scope="module")
def served(long_llm: LLM) -> Iterator[Served]:
    s = Served(long_llm, max_batch=4, prefill_chunk=64, max_model_len=1000)
    yield s
    s.close()


def test_requests_of_every_length_share_one_bucket(served: Served, long_llm: LLM) -> None:
    kv = rows_of(served)
    bucket, keys = kv.bucket, row_buckets(long_llm)
    # sized for max_model_len=1000 at startup, not for the first request
    assert (kv.rows, kv.max_len) == (4, 1024)
    assert (4, 1024, "rows") in keys
    models = httpx.get(f"{served.base}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert models["data"][0]["max_model_len"] == 1000
    long_prompt = [5] * 600  # 604 positions: a bucket sized for the first requests would have grown
    assert len(long_prompt) + 4 > MIN_LEN
    asks = [("x", 3), (long_prompt, 4), ("def fib(n):", 12), ([7] * 990, 10), ("import os", 1)]

    def ask(i: int) -> str:
        prompt, n = asks[i]
        r = served.client.completions.create(model="olmoe", prompt=prompt, max_tokens=n, temperature=0,
                                             extra_body={"ignore_eos": True})  # fmt: skip
        assert r.usage.completion_tokens == n
        return r.choices[0].text

    texts = [ask(0), ask(1)]  # one after the other: a short request, then a long one joins the same bucket
    with ThreadPoolExecutor(len(asks)) as pool:  # and all at once
        texts_together = list(pool.map(ask, range(len(asks))))
    assert kv.bucket is bucket and (kv.max_len, row_buckets(long_llm)) == (1024, keys)
    assert texts_together[:2] == texts
    want = long_llm.generate([long_prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert texts[1] == want[0].text


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_longer_than_max_model_len_is_refused(served: Served, stream: bool) -> None:
    for prompt, max_tokens, hint in (([5] * 990, 20, "lower max_tokens to 10"),
                                     ([5] * 1001, 1, "shorten the prompt")):  # fmt: skip
        with pytest.raises(openai.BadRequestError) as err:
            served.client.completions.create(
                model="olmoe", prompt=prompt, max_tokens=max_tokens, stream=stream
            )
        body = err.value.body
        assert err.value.status_code == 400
        assert (body["type"], body["code"]) == ("invalid_request_error", "context_length_exceeded")
        assert "limit of 1000 (--max-model-len; the model's context is 2048)" in body["message"]
        assert hint in body["message"]
    r = httpx.post(f"{served.base}/v1/completions", json={"prompt": [5] * 1200, "max_tokens": 2},
                   headers={"Authorization": f"Bearer {KEY}"})  # fmt: skip
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = served.client.completions.create(model="olmoe", prompt=[5] * 990, max_tokens=10, temperature=0)
    assert r.usage.completion_tokens >= 1  # exactly max_model_len positions: served


def generated(served: Served) -> float:
    return metric(httpx.get(f"{served.base}/metrics").text, "moeflow_generated_tokens_total")


def test_warm_up_runs_once_before_the_server_listens(
    long_llm: LLM, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (4, 512, "rows") not in row_buckets(long_llm)  # a bucket no other test made
    s = Served(long_llm, max_batch=4, max_model_len=300)
    try:
        kv, engine = rows_of(s), s.app.state.engine
        assert engine.warmups == 1 and engine.warmup_s > 0
        assert kv.max_len == 512 and kv.bucket.decoded  # a static decode step ran already
        assert generated(s) == 0  # the warm-up is no client's request
        err = capsys.readouterr().err
        assert err.count("moeflow: warmed up in") == 1
        assert "(static decode step of 4 rows x 512 positions)" in err
        s.client.completions.create(model="olmoe", prompt="x", max_tokens=2, temperature=0)
        assert engine.warmups == 1 and generated(s) >= 1
    finally:
        s.close()


def test_no_warm_up(long_llm: LLM, capsys: pytest.CaptureFixture[str]) -> None:
    assert (4, 2048, "rows") not in row_buckets(long_llm)
    s = Served(long_llm, max_batch=4, max_model_len=1500, warmup=False)
    try:
        kv, engine = rows_of(s), s.app.state.engine
        assert engine.warmups == 0 and kv.max_len == 2048
        assert kv.bucket.route_host is None  # no decode step has run on this bucket
        assert "warmed up" not in capsys.readouterr().err
        s.client.completions.create(model="olmoe", prompt="x", max_tokens=2, temperature=0)
        assert kv.bucket.decoded and engine.warmups == 0
    finally:
        s.close()


def test_a_bucket_beyond_the_kv_reserve_fails_the_warm_up(long_llm: LLM) -> None:
    """The bucket holds max_batch rows of max_model_len positions from the start: one too large for the KV reserve
    fails at startup, in the warm-up, with the way out."""
    from moeflow.errors import BudgetError
    from moeflow.server import create_app
    from moeflow.server.app import warm_up

    with LLM(long_llm.model_dir, device="cpu", progress=False, batch_size=4, decode="static", num_slots=4,
             kv_reserve="1MiB") as tight:  # fmt: skip
        app = create_app(tight, max_model_len=CONTEXT)
        with pytest.raises(BudgetError, match=r"more than the KV reserve.*--max-model-len, now 2048"):
            warm_up(app)
        engine = app.state.engine
        assert engine.warmups == 0 and engine._thread is not None and not engine._thread.is_alive()
