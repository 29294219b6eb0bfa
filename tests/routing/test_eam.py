"""EAM counting, the collection's admission rule, prefix matching and atomic, crash-safe persistence."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from moeflow.routing.eam import EAMCollection, eam_from_experts, eams_from_trace, row_normalise
from moeflow.routing.eam_match import RequestEAM
from moeflow.routing.trace import Trace

L, E = 4, 6


def onehot_eam(experts_per_layer: list[int], count: float = 3.0) -> np.ndarray:
    """[L, E] with ``count`` tokens on one expert per layer."""
    m = np.zeros((len(experts_per_layer), E))
    m[np.arange(len(experts_per_layer)), experts_per_layer] = count
    return m


def test_eam_counts_tokens_per_layer_and_expert() -> None:
    experts = np.array([[[0, 1], [2, 3]], [[0, 2], [2, -1]]])  # [T=2, L=2, K=2], -1 padding
    eam = eam_from_experts(experts, 4)
    assert eam.tolist() == [[2, 1, 1, 0], [0, 0, 2, 1]]


def test_eams_from_trace_one_per_request() -> None:
    experts = np.array([[[0]], [[1]], [[1]]])  # [N=3, L=1, K=1]
    trace = Trace("m", 2, 1, np.array([5, 7, 5]), np.array([0, 0, 1]), np.ones(3, bool), np.arange(3),
                  np.full(3, -1), experts, np.ones((3, 1, 1), np.float32))  # fmt: skip
    eams = eams_from_trace(trace)
    assert list(eams) == [5, 7]
    assert eams[5].tolist() == [[1, 1]] and eams[7].tolist() == [[0, 1]]


def test_admission_fills_then_replaces_nearest_entry() -> None:
    c = EAMCollection(L, E, capacity=3)
    pats = [onehot_eam([0, 0, 0, 0]), onehot_eam([1, 1, 1, 1]), onehot_eam([2, 2, 2, 2])]
    assert [c.add(p) for p in pats] == [0, 1, 2]
    assert c.add(np.zeros((L, E))) == -1  # empty: rejected
    near_1 = onehot_eam([1, 1, 1, 3])  # 3 of 4 layers like entry 1
    assert c.add(near_1) == 1
    assert len(c) == 3
    assert np.array_equal(c.entries[1], near_1)
    assert np.array_equal(c.entries[0], pats[0]) and np.array_equal(c.entries[2], pats[2])
    assert c.members.tolist() == [1, 2, 1]


def test_similarity_uses_only_the_executed_rows() -> None:
    c = EAMCollection(L, E)
    past = onehot_eam([0, 1, 2, 3])  # agrees with the query on layers 0..1
    future = onehot_eam([5, 1, 4, 5])  # agrees with the query on layers 1..3
    c.extend([past, future])
    query = onehot_eam([0, 1, 4, 5])
    sims = c.similarity(query, upto=1)
    assert sims[0] == pytest.approx(1.0) and sims[1] == pytest.approx(0.5)
    assert c.nearest(sims, 1).tolist() == [0]
    pred = c.predict(sims, 1)
    assert np.allclose(pred, row_normalise(past))
    # over every row the future-matching entry wins
    assert c.nearest(c.similarity(query, upto=3), 1).tolist() == [1]


def test_similarity_is_scale_free_per_row() -> None:
    c = EAMCollection(L, E)
    c.add(onehot_eam([0, 1, 2, 3], count=1))
    long_prompt = onehot_eam([0, 1, 2, 3], count=500)
    assert c.similarity(long_prompt, 3)[0] == pytest.approx(1.0)


def test_predict_weights_top_k_by_similarity() -> None:
    c = EAMCollection(1, 3)
    c.extend([np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]), np.array([[0, 0, 1.0]])])
    sims = np.array([0.6, 0.2, 0.0])
    assert np.allclose(c.predict(sims, 1), [[1, 0, 0]])
    assert np.allclose(c.predict(sims, 2), [[0.75, 0.25, 0]])
    assert EAMCollection(1, 3).predict(np.zeros(0)) is None


def test_request_eam_cached_matching_equals_direct() -> None:
    rng = np.random.default_rng(0)
    c = EAMCollection(L, E)
    c.extend(rng.integers(0, 4, size=(5, L, E)).astype(float))
    req = RequestEAM(L, E)
    for step in range(3):
        for layer in range(L):
            req.add(layer, rng.integers(0, E, size=(2, 2)))
            assert np.allclose(req.similarity(c, layer), c.similarity(req.counts, layer))
        if step == 1:
            c.add(rng.integers(1, 4, size=(L, E)).astype(float))  # collection changed: caches refresh


def test_save_load_round_trip(tmp_path) -> None:
    c = EAMCollection(L, E, capacity=7)
    c.extend([onehot_eam([0, 1, 2, 3]), onehot_eam([3, 2, 1, 0])])
    c.save(tmp_path / "sub" / "eamc.npz")
    d = EAMCollection.load(tmp_path / "sub" / "eamc.npz", L, E)
    assert d.capacity == 7 and np.array_equal(d.entries, c.entries) and d.members.tolist() == [1, 1]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["eamc.npz"]


def test_crash_while_saving_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "eamc.npz"
    c = EAMCollection(L, E)
    c.add(onehot_eam([0, 1, 2, 3]))
    c.save(path)
    before = path.read_bytes()
    c.add(onehot_eam([4, 4, 4, 4]))

    def crash(file, **arrays):  # writes half a file, then dies
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        c.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["eamc.npz"]


@pytest.mark.parametrize("content", [b"", b"not a zip file at all", b"PK\x03\x04 truncated"])
def test_corrupt_file_warns_and_starts_empty(tmp_path, content: bytes) -> None:
    path = tmp_path / "eamc.npz"
    path.write_bytes(content)
    with pytest.warns(UserWarning, match="unreadable"):
        c = EAMCollection.load(path, L, E)
    assert len(c) == 0 and c.entries.shape == (0, L, E)


def test_wrong_shape_warns_and_missing_file_is_silent(tmp_path) -> None:
    c = EAMCollection(L, E)
    c.add(onehot_eam([0, 1, 2, 3]))
    c.save(tmp_path / "eamc.npz")
    with pytest.warns(UserWarning, match="the model has"):
        assert len(EAMCollection.load(tmp_path / "eamc.npz", L + 1, E)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(EAMCollection.load(tmp_path / "absent.npz", L, E)) == 0


def test_copy_is_independent() -> None:
    c = EAMCollection(L, E)
    c.add(onehot_eam([0, 1, 2, 3]))
    d = c.copy()
    d.add(onehot_eam([1, 1, 1, 1]))
    assert len(c) == 1 and len(d) == 2
