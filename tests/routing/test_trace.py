"""Tests of routing/trace.py: the .npz format (round trip, atomic write, errors), recorder and replay."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from moeflow.errors import TraceError
from moeflow.routing import trace as trace_mod
from moeflow.routing.trace import FORMAT, Trace, TraceRecorder, TraceReplay


def sample_trace(n: int = 6, num_layers: int = 3, num_experts: int = 8, k: int = 2) -> Trace:
    rng = np.random.default_rng(0)
    experts = np.stack(
        [[rng.choice(num_experts, k, replace=False) for _ in range(num_layers)] for _ in range(n)]
    )
    return Trace(
        model="demo",
        num_experts=num_experts,
        top_k=k,
        request=np.array([0, 0, 0, 1, 1, 0])[:n],
        position=np.array([0, 1, 2, 0, 1, 3])[:n],
        decode=np.array([False, False, False, False, False, True])[:n],
        step=np.array([0, 0, 0, 0, 0, 1])[:n],
        token=np.arange(100, 100 + n),
        experts=experts,
        weights=rng.random((n, num_layers, k)).astype(np.float32),
        moe_layer_ids=np.array([1, 3, 5]),
        mapping="",
        prompts={0: "hello", 1: "line\nbreak"},
    )


def test_round_trip(tmp_path: Path) -> None:
    t = sample_trace()
    path = tmp_path / "sub" / "t.npz"
    t.save(path)
    back = Trace.load(path)
    assert (back.model, back.num_experts, back.top_k, back.num_layers, back.num_tokens) == (
        "demo",
        8,
        2,
        3,
        6,
    )
    for name in ("request", "position", "decode", "step", "token", "experts", "weights", "moe_layer_ids"):
        np.testing.assert_array_equal(getattr(back, name), getattr(t, name), err_msg=name)
    assert back.prompts == {0: "hello", 1: "line\nbreak"} and back.mapping == ""
    with np.load(path) as z:
        assert str(z["format"]) == FORMAT and z["experts"].dtype == np.int16 and int(z["num_layers"]) == 3


def test_default_layer_ids_and_no_prompts(tmp_path: Path) -> None:
    t = sample_trace()
    t.moe_layer_ids, t.prompts, t.mapping = None, {}, "model layer l <- trace layer l mod 3"
    t.save(tmp_path / "t.npz")
    back = Trace.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.moe_layer_ids, [0, 1, 2])
    assert back.prompts == {} and back.mapping.startswith("model layer")


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "t.npz"
    sample_trace().save(path)
    before = path.read_bytes()

    def boom(*args: object, **kwargs: object) -> None:
        Path(args[0]).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trace_mod.np, "savez_compressed", boom)
    with pytest.raises(OSError, match="disk full"):
        sample_trace(n=2).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npz"]  # no temp file left behind


def test_select_and_requests() -> None:
    t = sample_trace()
    assert t.requests() == [0, 1]
    sub = t.of_requests([1])
    np.testing.assert_array_equal(sub.position, [0, 1])
    assert sub.prompts == {1: "line\nbreak"} and sub.num_layers == 3


@pytest.mark.parametrize("kind", ["missing", "garbage", "wrong_format", "short_field"])
def test_load_errors(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "t.npz"
    if kind == "garbage":
        path.write_bytes(b"not a zip")
    elif kind == "wrong_format":
        np.savez(path, format=np.array("other/1"), experts=np.zeros((1, 1, 1)))
    elif kind == "short_field":
        sample_trace().save(path)
        with np.load(path) as z:
            arrays = dict(z)
        arrays["position"] = arrays["position"][:-1]
        np.savez(path, **arrays)
    message = {
        "missing": "does not exist",
        "garbage": "not a readable",
        "wrong_format": FORMAT,
        "short_field": "'position' has 5 rows",
    }[kind]
    with pytest.raises(TraceError, match=message):
        Trace.load(path)


def test_recorder_keeps_unpadded_rows() -> None:
    rec = TraceRecorder("m", num_layers=2, num_experts=4, top_k=1, moe_layer_ids=[0, 2])
    rec.begin_step(0, [7, 9], [[0, 1], [0]], [[11, 12], [13]], prefill=True)
    for layer in range(2):
        ex = np.array([[0], [1], [3], [2]])  # 4 rows, the last one padding
        rec.record(layer, ex + layer, np.ones((4, 1)), keep=np.array([True, True, True, False]))
    rec.end_step()
    rec.begin_step(1, [7], [[2]], [[14]], prefill=False)
    rec.record(0, np.array([[1]]), np.ones((1, 1)))
    rec.record(1, np.array([[0]]), np.ones((1, 1)))
    rec.end_step()
    t = rec.trace()
    np.testing.assert_array_equal(t.request, [7, 7, 9, 7])
    np.testing.assert_array_equal(t.position, [0, 1, 0, 2])
    np.testing.assert_array_equal(t.decode, [False, False, False, True])
    np.testing.assert_array_equal(t.step, [0, 0, 0, 1])
    np.testing.assert_array_equal(t.token, [11, 12, 13, 14])
    np.testing.assert_array_equal(t.experts[:, 1, 0], [1, 2, 4, 0])


def test_recorder_empty_raises() -> None:
    with pytest.raises(TraceError, match="nothing was recorded"):
        TraceRecorder("m", 1, 2, 1, [0]).trace()


def test_replay_lookup_and_mapping() -> None:
    t = sample_trace()
    same = TraceReplay(t, num_layers=3, num_experts=8, top_k=2)
    assert same.mapping == ""
    rows = same.rows([1, 0], [[0, 1], [3]])
    np.testing.assert_array_equal(rows, [3, 4, 5])
    ex, w = same.route(rows, 2)
    np.testing.assert_array_equal(ex, t.experts[[3, 4, 5], 2])
    np.testing.assert_array_equal(w, t.weights[[3, 4, 5], 2])
    deeper = TraceReplay(t, num_layers=5, num_experts=16, top_k=2)
    assert "mod 3" in deeper.mapping
    np.testing.assert_array_equal(deeper.route(rows, 4)[0], t.experts[[3, 4, 5], 1])
    with pytest.raises(TraceError, match="request 1 position 9"):
        same.rows([1], [[9]])


def test_replay_shape_errors() -> None:
    t = sample_trace()
    with pytest.raises(TraceError, match="top-2"):
        TraceReplay(t, 3, 8, top_k=1)
    with pytest.raises(TraceError, match="only 4"):
        TraceReplay(t, 3, 4, top_k=2)
