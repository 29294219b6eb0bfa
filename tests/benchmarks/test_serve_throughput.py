"""benchmarks/serve_throughput.py: offline and serving runs of the same replayed requests do the same work (every
request's tokens, the cycled request ids never running twice at once), on the static and the eager row path, and offline with the overlapped decode."""

from __future__ import annotations

from pathlib import Path

from benchmarks.policy_decode import TimedLLM, requests_of
from benchmarks.serve_throughput import offline, offline_overlapped, serve
from moeflow import LLM, SamplingParams
from tests.engine.test_batch import PROMPTS


def test_offline_and_serving_runs_do_the_same_work(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    with LLM(path, device="cpu", record_trace=True, progress=False) as rec:
        rec.generate(PROMPTS[:4], SamplingParams(max_tokens=10, ignore_eos=True))
        trace = rec.trace()
    base = requests_of(trace, 4, max_prompt=3, max_tokens=6)
    reqs = [base[i % 4] for i in range(7)]  # cycled: ids come back while others run
    with TimedLLM(path, device="cpu", replay=trace, decode="static", progress=False) as llm:
        rows = [offline(llm, reqs, 3, 6), serve(llm, reqs, 3, 6, 4, True), serve(llm, reqs, 3, 6, 4, False)]
        own = llm.overlap
        rows += [offline_overlapped(llm, reqs, 3, 6), offline_overlapped(llm, reqs, 3, 6, on=False)]
        assert llm.overlap is own  # the engine's own overlap (or none) is back
        alone = serve(llm, reqs[:3], 1, 6, 4, True)  # batch-1 serving: one stream
    assert alone["tokens"] == 3 * 6 and alone["mean_sequences_per_decode_step"] == 1
    for r in rows:
        assert r["tokens"] == 7 * 6 and r["decode_tokens"] == 7 * 5
        assert 1 <= r["mean_sequences_per_decode_step"] <= 3 and r["decode_tokens_per_s"] > 0
    assert rows[1]["mean_sequences_per_decode_step"] > 2  # the streams decode together
