"""The routing-path predictor: the NumPy runtime equals the torch net, the file round-trips, training learns
routing that depends on the token and its context, and the metrics and baselines give known answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moeflow.cli import main
from moeflow.errors import MoeflowError
from moeflow.routing import predictor_eval as pe
from moeflow.routing import predictor_train as pt
from moeflow.routing import sequences as rs
from moeflow.routing.predictor import (
    PredictorConfig,
    PredictorNet,
    RoutingPredictor,
    load_net,
    load_predictor,
    save_predictor,
)
from moeflow.routing.trace import Trace

L, E, K, V = 3, 8, 2, 30


def routing(tokens: np.ndarray) -> np.ndarray:
    """Layer 0 follows the token, layer 1 the previous token, layer 2 both: [n, L, K]."""
    prev = np.concatenate([[V], tokens[:-1]])
    keys = [tokens, prev, tokens * 7 + prev]
    return np.stack([np.stack([k % E, (k // E + k % E + 1) % E], -1) for k in keys], 1)


def make_trace(requests: int, prefill: int = 6, decode: int = 10, seed: int = 0) -> Trace:
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("request", "position", "decode", "step", "token", "experts")}
    for r in range(requests):
        toks = rng.integers(0, V, prefill + decode)
        ex = routing(toks)
        for p in range(prefill + decode):
            step = r * 100 + max(0, p - prefill + 1)  # the prompt runs in one step, then one step per token
            for k, v in zip(cols, (r, p, p >= prefill, step, toks[p], ex[p])):
                cols[k].append(v)
    ex = np.asarray(cols["experts"])
    arrays = [np.asarray(cols[k]) for k in ("request", "position", "decode", "step", "token")]
    return Trace("toy", E, K, *arrays, ex, np.ones(ex.shape, np.float32))


def tiny_net(prev: bool = True) -> PredictorNet:
    torch.manual_seed(0)
    return PredictorNet(PredictorConfig(L, E, K, V + 1, emb_dim=8, hidden=16, use_prev_routing=prev))


def test_numpy_runtime_matches_torch_net_across_calls() -> None:
    net = tiny_net()
    for p in net.parameters():  # larger weights so that a mismatch would show
        torch.nn.init.normal_(p, std=0.5)
    vocab = np.arange(0, 2 * V, 2)  # even ids kept; odd ids map to row 0
    rt = RoutingPredictor(net.cfg, vocab, {k: v.numpy() for k, v in net.state_dict().items()})
    tokens = np.array([4, 7, 10, 58, 3])
    prev = np.zeros((L, E), np.float32)
    prev[:, :K] = 1
    with torch.no_grad():
        ids = torch.from_numpy(rt.remap(tokens))[None]
        pv = torch.zeros(1, 5, L * E)
        pv[0, 3] = torch.from_numpy(prev.reshape(-1))  # the step of tokens 3.. gets the previous routing
        want = torch.sigmoid(net(ids, pv)[0][0]).numpy().reshape(5, L, E)
    got1, h = rt.predict(tokens[:3], rt.init_state())  # a prefill of three tokens...
    got2, _ = rt.predict(tokens[3:], h, prev)  # ...then a step of two, carrying the GRU state
    np.testing.assert_allclose(np.concatenate([got1, got2]), want, atol=1e-5)
    assert rt.remap(np.array([4, 5, 58, 60])).tolist() == [3, 0, 30, 0]


def test_save_and_load_round_trip(tmp_path) -> None:
    net = tiny_net()
    path = save_predictor(tmp_path / "m" / "moeflow" / "predictor.pt", net, np.arange(V), {"note": "x"})
    rt = load_predictor(path)
    net2, vocab, info = load_net(path)
    assert info == {"note": "x"} and vocab.tolist() == list(range(V))
    probs, _ = rt.predict(np.array([1, 2, 3]), rt.init_state())
    with torch.no_grad():
        want = torch.sigmoid(net2(torch.tensor([[2, 3, 4]]), None)[0][0]).numpy().reshape(3, L, E)
    np.testing.assert_allclose(probs, want, atol=1e-5)
    assert np.abs(probs - torch.sigmoid(net(torch.tensor([[2, 3, 4]]), None)[0][0]).detach().numpy().reshape(3, L, E)).max() < 2e-3  # fp16 file  # fmt: skip


def test_load_errors_name_the_fix(tmp_path) -> None:
    with pytest.raises(MoeflowError, match="predictor train"):
        load_predictor(tmp_path / "missing.pt")
    torch.save({"format": "other"}, tmp_path / "bad.pt")
    with pytest.raises(MoeflowError, match="retrain"):
        load_predictor(tmp_path / "bad.pt")


def test_sequences_mark_what_is_known_before_each_token() -> None:
    seq = rs.request_sequences(make_trace(1))[0]
    assert seq.known.tolist() == [False] * 6 + [True] * 10  # prompt tokens run together; decode sees prev
    prev = rs.prev_routing(seq, E)
    assert not prev[:6].any() and (prev[6] == rs.multi_hot(seq.experts[5], E)).all()


def test_split_is_by_request() -> None:
    seqs = rs.request_sequences(make_trace(20))
    rest, held = rs.split_requests(seqs, 0.25, seed=1)
    assert len(held) == 5 and len(rest) == 15
    assert not {id(s) for s in rest} & {id(s) for s in held}


def test_metrics_known_answer() -> None:
    scores = np.zeros((2, 1, 4))
    scores[0, 0] = [0.9, 0.8, 0.1, 0.0]  # top-2 {0, 1}, top-3 adds 2
    scores[1, 0] = [0.0, 0.1, 0.8, 0.9]  # top-2 {3, 2}
    experts = np.array([[[0, 2]], [[0, 1]]])
    assert pe.topk_hits(scores, experts, 2)[:, 0].tolist() == [1, 0]
    assert pe.topk_hits(scores, experts, 3)[:, 0].tolist() == [2, 1]
    seq = rs.RequestSeq(np.zeros(2, int), experts, np.zeros(2, bool), np.array([False, True]), np.ones(2, bool), np.arange(2))  # fmt: skip
    res = pe.evaluate(lambda s: scores, [seq], k=2, m=3)
    assert res["overall"]["recall"] == pytest.approx(0.75) and res["overall"]["precision"] == pytest.approx(
        0.5
    )
    assert res["prefill"]["recall"] == 1.0 and res["decode"]["recall"] == 0.5


def test_last_token_baseline_uses_only_known_routing() -> None:
    seq = rs.request_sequences(make_trace(1))[0]
    pop = np.full((L, E), 1 / E)
    pop[:, 7] = 0.5
    scores = pe.last_token_scorer(pop)(seq)
    assert (np.argmax(scores[:6], -1) == 7).all()  # prompt tokens: popularity
    hits = pe.topk_hits(
        scores[6:], seq.experts[5:-1], K
    )  # decode tokens: exactly the previous token's experts
    assert (hits == K).all()


def test_training_learns_token_and_context_routing() -> None:
    cfg = pt.TrainConfig(
        emb_dim=16, hidden=48, window=16, burn_in=4, batch=16, lr=1e-2, max_epochs=60, patience=8
    )
    net, vocab, info = pt.train_predictor([make_trace(120, seed=1)], cfg, progress=False)
    test = rs.request_sequences(make_trace(20, seed=2))
    res = pe.evaluate(pe.net_scorer(net, vocab), test, K)
    pop = pe.popularity_scorer(np.asarray(info["popularity"]))
    base = pe.evaluate(pop, test, K)["overall"]["recall"]
    per_layer = res["overall"]["recall_per_layer"]
    assert per_layer[0] > 0.95 and per_layer[1] > 0.9 and per_layer[2] > 0.45, per_layer
    assert res["overall"]["recall"] > base + 0.4
    assert info["epochs"] <= 60 and info["params"] < 1_000_000


def test_cli_train_then_eval(tmp_path, capsys) -> None:
    make_trace(30, seed=3).save(tmp_path / "train.npz")
    make_trace(6, seed=4).save(tmp_path / "test.npz")
    model = tmp_path / "model"
    args = [
        "predictor",
        "train",
        "--traces",
        str(tmp_path / "train.npz"),
        "--model",
        str(model),
        "--epochs",
        "2",
    ]
    assert main([*args, "--hidden", "16", "--emb-dim", "8"]) == 0
    assert (model / "moeflow" / "predictor.pt").exists()
    capsys.readouterr()
    args = ["predictor", "eval", "--model", str(model), "--traces", str(tmp_path / "test.npz"), "--json"]
    assert main([*args, "--train-traces", str(tmp_path / "train.npz")]) == 0
    report = json.loads(capsys.readouterr().out)
    methods = report["results"]
    assert {"predictor", "last-token", "popularity", "eam-match"} <= set(methods)
    assert len(methods["predictor"]["top2"]["overall"]["recall_per_layer"]) == L
    assert report["cpu_time"]["decode_us_per_token"] > 0
    assert main(["predictor", "eval", "--traces", str(tmp_path / "test.npz")]) == 2  # no predictor named
