"""Step-batched EAM matching (``routing.eam_match``): ``match`` of several requests equals each request matched on
its own, bit for bit, through layers, steps and admissions; ``predict_batch`` equals ``EAMCollection.predict`` row for
row, ties included (where the best entry is ``nearest``'s choice, not the first index)."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from moeflow.experts.policies.activations import RunningActivations
from moeflow.routing.eam import EAMCollection
from moeflow.routing.eam_match import RequestEAM, match, predict_batch

L, E, N = 5, 12, 40


def collection(seed: int = 0, duplicates: bool = True) -> EAMCollection:
    rng = np.random.default_rng(seed)
    entries = rng.poisson(0.4, (N, L, E)).astype(np.float32)
    if duplicates:  # identical entries: their similarities tie exactly
        entries[N // 2 :] = entries[: N // 2]
    c = EAMCollection(L, E, N + 4)
    c.extend(entries)
    return c


def test_match_of_a_step_equals_each_request_alone_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    c = collection()
    batch = [RequestEAM(L, E) for _ in range(4)]
    alone = copy.deepcopy(batch)
    for step in range(6):
        for layer in range(-1, L):
            upto = layer if layer >= 0 else L - 1
            if layer >= 0:
                for b, a in zip(batch, alone):
                    ex = rng.integers(0, E, size=(int(rng.integers(0, 3)), 2))  # some route no token
                    b.add(layer, ex)
                    a.add(layer, ex)
            got = match(batch, c, upto)
            for i, a in enumerate(alone):
                assert np.array_equal(got[i], a.similarity(c, upto))
                assert np.allclose(got[i], c.similarity(a.counts, upto))
        if step in (1, 3):  # admissions (one replaces its nearest entry once full): the caches catch up
            for _ in range(3):
                c.add(rng.poisson(0.5, (L, E)).astype(np.float32))


def test_a_request_joining_later_matches_from_scratch() -> None:
    c = collection(duplicates=False)
    old, new = RequestEAM(L, E), RequestEAM(L, E)
    old.add(0, np.array([[1, 2]]))
    match([old], c, 0)
    c.add(np.ones((L, E), np.float32))
    new.add(0, np.array([[3, 4]]))
    got = match([old, new], c, 0)
    assert got.shape == (2, len(c))
    assert np.allclose(got[1], c.similarity(new.counts, 0)) and np.allclose(
        got[0], c.similarity(old.counts, 0)
    )


@pytest.mark.parametrize("k", [1, 3])
def test_predict_batch_equals_predict_ties_included(k: int) -> None:
    c = collection()
    rng = np.random.default_rng(2)
    sims = rng.random((6, N))
    sims[1] = 0.0  # every entry tied
    sims[2, [3, 9, 30]] = 2.0  # a tie for the best among a few
    sims[3] = np.round(sims[3], 1)  # many ties, some at the top
    got = predict_batch(c, sims, k)
    for i in range(len(sims)):
        assert np.array_equal(got[i], c.predict(sims[i], k))


def test_ties_follow_nearest_not_the_first_index() -> None:
    """Over large arrays NumPy's selection returns one of the tied best, not always the first: find such a case."""
    c = EAMCollection(1, 4, 2000)
    c.extend(np.random.default_rng(3).integers(0, 3, (2000, 1, 4)).astype(np.float32))
    rng = np.random.default_rng(4)
    for _ in range(50):
        sims = rng.integers(0, 3, (1, len(c))).astype(float)
        best = c.nearest(sims[0], 1)[0]
        if best != sims[0].argmax():
            break
    else:
        pytest.skip("nearest() picked the first of the tied in every case tried")
    assert np.array_equal(predict_batch(c, sims)[0], c.unit_by_layer[:, best])
    assert not np.array_equal(c.unit_by_layer[:, best], c.unit_by_layer[:, sims[0].argmax()])


def test_running_activations_reject_an_out_of_range_expert() -> None:
    acts = RunningActivations(L, E)
    acts.begin_step((0, 1), 0.8, 0.5)
    acts.add(0, np.array([[1, 2], [3, 4]]), (1, 1))
    assert acts.eams[0].counts[0].tolist() == acts.counts[0, 0].tolist() == [0, 1, 1] + [0] * (E - 3)
    with pytest.raises(IndexError, match="out of range"):  # would otherwise count for request 1's expert 0
        acts.add(1, np.array([[E, 2], [3, 4]]), (1, 1))
