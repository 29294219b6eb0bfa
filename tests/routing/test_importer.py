"""Tests of routing/importer.py: JSON-lines routing logs -> Trace."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeflow.errors import TraceError
from moeflow.routing.importer import import_jsonl, import_jsonl_with_report
from moeflow.routing.trace import Trace

# shared/ sits beside the repository root (../shared); the test skips where it is absent
MIXTRAL = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mixtral-8x7b-instruct-gsm8k.jsonl"


def _row(req: int, tok: int, layer: int, experts: list[int], probs: list[float]) -> dict:
    return {
        "dataset": "x",
        "problem_id": req,
        "token_idx": tok,
        "layer": layer,
        "experts": experts,
        "gating_probs": probs,
    }


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_import_layer_major_file(tmp_path: Path) -> None:
    # Layer-major order like the real log; request 1 token 0 lacks layer 1 and must be skipped.
    rows = [
        _row(0, 0, 0, [1, 2], [0.6, 0.4]),
        _row(0, 1, 0, [3, 0], [0.7, 0.3]),
        _row(1, 0, 0, [2, 3], [0.5, 0.5]),
        _row(1, 1, 0, [0, 1], [0.9, 0.1]),
        _row(0, 0, 1, [2, 1], [0.8, 0.2]),
        _row(0, 1, 1, [0, 3], [0.55, 0.45]),
        _row(1, 1, 1, [3, 2], [0.6, 0.4]),
    ]
    trace, report = import_jsonl_with_report(_write(tmp_path / "log.jsonl", rows), model="m", num_experts=6)
    assert (report.rows, report.tokens_kept, report.tokens_skipped) == (7, 3, 1)
    assert trace.model == "m" and trace.num_experts == 6 and trace.top_k == 2 and trace.num_layers == 2
    np.testing.assert_array_equal(trace.request, [0, 0, 1])
    np.testing.assert_array_equal(trace.position, [0, 1, 1])
    np.testing.assert_array_equal(trace.step, [0, 1, 2])
    assert trace.decode.all() and (trace.token == -1).all()
    np.testing.assert_array_equal(trace.experts[2], [[0, 1], [3, 2]])
    np.testing.assert_allclose(trace.weights[1, 1], [0.55, 0.45])


def test_defaults_and_round_trip(tmp_path: Path) -> None:
    rows = [_row(5, t, layer, [t % 4, (t + 1) % 4], [0.5, 0.5]) for layer in range(3) for t in range(4)]
    src = _write(tmp_path / "mylog.jsonl", rows)
    trace = import_jsonl(src)
    assert trace.model == "mylog" and trace.num_experts == 4 and trace.num_layers == 3
    trace.save(tmp_path / "t.npz")
    back = Trace.load(tmp_path / "t.npz")
    np.testing.assert_array_equal(back.experts, trace.experts)
    np.testing.assert_array_equal(back.request, [5, 5, 5, 5])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "expected a JSON object"),
        (json.dumps({"problem_id": 0, "token_idx": 0, "layer": 0, "experts": [1]}), "expected a JSON object"),
        (json.dumps(_row(0, 0, 0, [1, 2], [1.0])), "equal length"),
        (json.dumps(_row(0, 0, -1, [1, 2], [0.5, 0.5])), "non-negative"),
    ],
)
def test_bad_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(_row(0, 0, 0, [1, 2], [0.5, 0.5])) + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message) as err:
        import_jsonl(path)
    assert "bad.jsonl:2" in str(err.value)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="does not exist"):
        import_jsonl(tmp_path / "missing.jsonl")
    dup = _write(tmp_path / "dup.jsonl", [_row(0, 0, 0, [1, 2], [0.5, 0.5])] * 2)
    with pytest.raises(TraceError, match="appears twice"):
        import_jsonl(dup)
    mixed_k = _write(tmp_path / "k.jsonl", [_row(0, 0, 0, [1, 2], [0.5, 0.5]), _row(0, 1, 0, [1], [1.0])])
    with pytest.raises(TraceError, match="earlier lines had 2"):
        import_jsonl(mixed_k)
    few = _write(tmp_path / "few.jsonl", [_row(0, 0, 0, [7, 2], [0.5, 0.5])])
    with pytest.raises(TraceError, match="--num-experts is 4"):
        import_jsonl(few, num_experts=4)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no rows"):
        import_jsonl(tmp_path / "empty.jsonl")


@pytest.mark.skipif(not MIXTRAL.is_file(), reason="shared Mixtral trace not present")
def test_real_mixtral_log() -> None:
    trace, report = import_jsonl_with_report(MIXTRAL, model="mixtral-8x7b-instruct")
    # README: 244 decode tokens, 7,889 rows, 32 layers, 8 experts, top-2.
    assert (report.rows, report.tokens_kept) == (7889, 244)
    assert (trace.num_layers, trace.num_experts, trace.top_k) == (32, 8, 2)
    assert set(trace.requests()) == {0, 1}
    # Each request's positions increase in file order.
    for r in trace.requests():
        assert (np.diff(trace.position[trace.request == r]) > 0).all()
    np.testing.assert_allclose(trace.weights.sum(-1), 1.0, atol=1e-4)


def test_trace_import_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from moeflow.cli import main

    rows = [_row(0, t, layer, [t % 3, 3], [0.7, 0.3]) for layer in range(2) for t in range(3)]
    rows.append(_row(0, 3, 0, [1, 2], [0.5, 0.5]))  # token 3 lacks layer 1
    src = _write(tmp_path / "log.jsonl", rows)
    out = tmp_path / "t.npz"
    assert main(["trace-import", str(src), "--out", str(out), "--model", "mx", "--num-experts", "8"]) == 0
    assert "3 tokens from 7 rows (1 tokens skipped" in capsys.readouterr().out
    trace = Trace.load(out)
    assert (trace.model, trace.num_experts, trace.num_tokens) == ("mx", 8, 3)
    assert main(["trace-import", str(tmp_path / "missing.jsonl"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
