"""Recording router inputs on a tiny OLMoE checkpoint, the file round trip, and ``moeflow predictor record|eval``
by look-ahead distance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from moeflow.cli import main
from moeflow.routing.hidden import HiddenRecord, record_hidden
from moeflow.routing.hybrid import recall_at_k
from moeflow.routing.predictor import PredictorConfig, PredictorNet, save_predictor

PROMPTS = ["the cat sat on the mat and then", "def f(x):\n    return x + 1\n", "one two three four five six"]


@pytest.fixture(scope="module")
def recorded(checkpoints: dict[str, Path]) -> HiddenRecord:
    return record_hidden(checkpoints["olmoe"], PROMPTS, prefill=6, decode=4, progress=False)


def test_own_router_on_the_recorded_input_reproduces_the_routing(recorded: HiddenRecord) -> None:
    t = recorded.trace
    assert recorded.residual.shape == (t.num_tokens, t.num_layers, recorded.gate_weight.shape[2])
    for layer in range(t.num_layers):
        assert recall_at_k(recorded.gate_logits(layer), t.experts[:, layer], t.top_k) == 1.0
    first = t.request == t.requests()[0]
    assert (
        t.decode[first].sum() == 4 and len(np.unique(t.step[first])) == 5
    )  # one prefill step, 4 decode steps


def test_teacher_forced_decode_tokens_are_the_prompts_own(checkpoints: dict[str, Path]) -> None:
    rec = record_hidden(
        checkpoints["olmoe"], PROMPTS[:1], prefill=3, decode=2, progress=False, generate=False
    )
    assert rec.trace.num_tokens == 5 and rec.trace.decode.tolist() == [False] * 3 + [True] * 2


def test_file_round_trip(recorded: HiddenRecord, tmp_path: Path) -> None:
    recorded.save(tmp_path / "h.npz")
    back = HiddenRecord.load(tmp_path / "h.npz")
    assert np.array_equal(back.trace.experts, recorded.trace.experts)
    assert np.array_equal(back.residual, recorded.residual) and np.array_equal(back.embed, recorded.embed)


def test_cli_record_and_eval_by_lookahead(checkpoints: dict[str, Path], tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS))
    out = tmp_path / "h.npz"
    assert main(["predictor", "record", "--model", str(checkpoints["olmoe"]), "--prompts", str(prompts), "--out",
                 str(out), "--prefill", "6", "--decode", "3"]) == 0  # fmt: skip
    rec = HiddenRecord.load(out)
    t = rec.trace
    net = PredictorNet(
        PredictorConfig(t.num_layers, t.num_experts, t.top_k, vocab_size=5, emb_dim=4, hidden=4)
    )
    pred = save_predictor(tmp_path / "p.pt", net, np.arange(4))
    capsys.readouterr()
    rc = main(["predictor", "eval", "--predictor", str(pred), "--hidden", str(out), "--train-hidden", str(out),
               "--grid-step", "0.5", "--json"])  # fmt: skip
    assert rc == 0
    res = json.loads(capsys.readouterr().out)["results"]
    assert set(res) == {"hybrid", "path", "gate", "gate_residual", "last_token", "popularity", "eam_match"}
    for method in res:
        for d in (1, 2, 4):
            assert 0.0 <= res[method][f"lookahead_{d}"]["recall"] <= 1.0
    assert res["gate"]["before_step"] is None and res["gate_residual"]["before_step"] is None
    # fitted and judged on the same tokens, the hybrid is at least as good as the path predictor it can fall back on
    assert res["hybrid"]["lookahead_1"]["recall"] >= res["path"]["lookahead_1"]["recall"]
    # --dev: fitted on the even-numbered requests of the training record, judged on the odd ones
    rc = main(["predictor", "eval", "--predictor", str(pred), "--train-hidden", str(out), "--dev", "--gate",
               "residual", "--grid-step", "0.5", "--json"])  # fmt: skip
    dev = json.loads(capsys.readouterr().out)
    assert rc == 0 and dev["gate"] == {"gate": "residual"} and "gate_residual" not in dev["results"]
    odd = np.isin(rec.trace.request, rec.trace.requests()[1::2])
    assert dev["results"]["path"]["lookahead_1"]["tokens"] == odd.sum() < rec.trace.num_tokens


def test_eval_needs_both_records(tmp_path: Path) -> None:
    assert (
        main(
            ["predictor", "eval", "--predictor", str(tmp_path / "p.pt"), "--hidden", str(tmp_path / "h.npz")]
        )
        == 2
    )
