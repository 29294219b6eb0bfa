"""ExpertFlow's step forecast, taken a chunk of tokens at a time, equals the one from the whole [T, L, E] array."""

from __future__ import annotations

import numpy as np

from moeflow.experts.cache import StepInfo
from moeflow.experts.policies.forecast import CHUNK, CLIP, Forecaster, StepForecast, top_mask
from tests.experts.policies.decision_log import EXPERTS, LAYERS, TOP_K, tiny_predictor


def argpartition_mask(probs: np.ndarray, k: int = TOP_K) -> np.ndarray:
    """[..., E] bool: the experts ``np.argpartition(-probs, k - 1, axis=-1)[..., :k]`` picks."""
    mask = np.zeros(probs.shape, bool)
    np.put_along_axis(mask, np.argpartition(-probs, k - 1, axis=-1)[..., :k], True, axis=-1)
    return mask


def unpacked(bits: np.ndarray, experts: int) -> np.ndarray:
    return np.unpackbits(bits, axis=-1, count=experts).astype(bool)


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
    assert np.array_equal(unpacked(got.in_top, EXPERTS), argpartition_mask(whole).transpose(1, 0, 2))
    assert np.array_equal(got.ends, p[np.cumsum(lengths) - 1])


def test_frequency_forecast_without_a_predictor() -> None:
    freq = np.random.default_rng(1).random((LAYERS, EXPERTS))
    fc = Forecaster(LAYERS, EXPERTS)
    got = fc.begin_step(StepInfo(0, (0,), ((1,) * (CHUNK + 3),), (0,), True), freq, TOP_K)
    rows = np.broadcast_to(freq.astype(np.float32), (CHUNK + 3, LAYERS, EXPERTS))
    assert got is not None and np.array_equal(got.log_miss, np.log1p(-np.clip(rows, 0, CLIP)).sum(axis=0))
    assert (unpacked(got.in_top, EXPERTS) == argpartition_mask(rows[0])[:, None]).all()


def test_top_mask_is_argpartitions_set_with_ties_and_nans() -> None:
    rng = np.random.default_rng(2)
    probs = rng.random((300, 4, 64)).astype(np.float32)
    probs[:100, :, :12] = 1.0  # 12 tied at the top: argpartition chooses 8 of them
    probs[100:150, 1, 5:9] = probs[100:150, 1, :1]  # ties around the boundary, some rows
    probs[150:160, 2, 3] = np.nan
    probs[160:170, 3] = 0.25  # a whole row tied
    got = top_mask(probs, 8)
    assert np.array_equal(got, argpartition_mask(probs, 8))
    assert (got.sum(axis=-1) == 8).all()
    assert np.array_equal(top_mask(probs[:, :, :8], 8), np.ones((300, 4, 8), bool))


def test_hits_counts_routed_experts_in_the_predicted_top_k() -> None:
    probs = np.zeros((3, 1, 16), np.float32)  # 3 tokens, 1 layer, 16 experts, top-2
    probs[:, 0, [9, 14]] = 1.0
    bits = np.packbits(top_mask(probs, 2), axis=-1).transpose(1, 0, 2)
    fc = StepForecast(3, np.zeros((1, 16), np.float32), bits, np.zeros((1, 1, 16), np.float32))
    ex = np.array([[9, 14], [14, 0], [3, -1]])
    assert fc.hits(0, ex).tolist() == [2, 1, 0]
