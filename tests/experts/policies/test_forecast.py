"""ExpertFlow's step forecast, taken a chunk of tokens at a time, equals the one from the whole [T, L, E] array."""

from __future__ import annotations

import numpy as np

from moeflow.experts.cache import StepInfo
from moeflow.experts.policies.forecast import CHUNK, CLIP, Forecaster
from tests.experts.policies.decision_log import EXPERTS, LAYERS, TOP_K, tiny_predictor


def test_chunked_forecast_equals_the_whole_array() -> None:
    pred = tiny_predictor()
    lengths = (CHUNK * 2 + 37, 5, 1)  # several chunks, then short requests
    rng = np.random.default_rng(0)
    toks = [tuple(int(t) for t in rng.integers(0, 50, n)) for n in lengths]
    fc = Forecaster(LAYERS, EXPERTS)
    fc.predictor = pred
    got = fc.begin_step(
        StepInfo(0, (0, 1, 2), tuple(toks), (0, 0, 0), True), np.zeros((LAYERS, EXPERTS)), TOP_K
    )
    whole = np.concatenate([pred.predict(np.asarray(t), pred.init_state())[0] for t in toks])  # [T, L, E]
    p = np.clip(whole, 0.0, CLIP)
    assert got is not None and got.tokens == sum(lengths)
    assert np.array_equal(got.log_miss, np.log1p(-p).sum(axis=0))  # bit for bit: same order of summation
    assert np.array_equal(got.top, np.argpartition(-whole, TOP_K - 1, axis=-1)[..., :TOP_K])
    assert np.array_equal(got.ends, p[np.cumsum(lengths) - 1])


def test_frequency_forecast_without_a_predictor() -> None:
    freq = np.random.default_rng(1).random((LAYERS, EXPERTS))
    fc = Forecaster(LAYERS, EXPERTS)
    got = fc.begin_step(StepInfo(0, (0,), ((1,) * (CHUNK + 3),), (0,), True), freq, TOP_K)
    rows = np.broadcast_to(freq.astype(np.float32), (CHUNK + 3, LAYERS, EXPERTS))
    assert got is not None and np.array_equal(got.log_miss, np.log1p(-np.clip(rows, 0, CLIP)).sum(axis=0))
    assert (got.top == np.argpartition(-rows[0], TOP_K - 1, axis=-1)[:, :TOP_K]).all()
