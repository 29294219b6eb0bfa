"""ExpertFlow's policy: prediction-driven prefetch, demotion of mispredictions, trust, quotas, slot reuse, the
frequency fallback, and runs in the simulator with oracle and trained predictors."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pytest

from moeflow.errors import MoeflowError
from moeflow.experts.cache import PolicyContext, StepInfo
from moeflow.experts.policies import make_policy
from moeflow.experts.policies.expertflow import ExpertFlowPolicy
from moeflow.routing.trace import Trace
from moeflow.sim import simulate

L, E, K = 4, 8, 2


@dataclass
class _Cfg:
    top_k: int
    hidden: int = 1


class TablePredictor:
    """Predicts from a table {token id: probabilities [L, E]} (an oracle when the table holds the truth)."""

    def __init__(self, table: dict[int, np.ndarray], shape=(L, E), top_k=K):
        self.table, self.shape, self.cfg = table, shape, _Cfg(top_k)
        self.calls: list[tuple[tuple[int, ...], bool]] = []

    def init_state(self) -> np.ndarray:
        return np.zeros(1, np.float32)

    def predict(self, tokens, state, prev=None):
        self.calls.append((tuple(int(t) for t in tokens), prev is not None))
        flat = np.full(self.shape, K / self.shape[1], np.float32)
        return np.stack([self.table.get(int(t), flat) for t in tokens]), state


def hot(rows: list[list[int]]) -> np.ndarray:
    out = np.zeros((L, E), np.float32)
    for layer, experts in enumerate(rows):
        out[layer, experts] = 1.0
    return out


def policy(slots: int, table: dict | None = None, **options) -> ExpertFlowPolicy:
    pol = ExpertFlowPolicy()
    pol.bind(slots, L, E, K)
    opts = dict(options)
    if table is not None:
        opts["predictor"] = TablePredictor(table)
    pol.setup(PolicyContext(options=opts))
    return pol


def step(pol: ExpertFlowPolicy, tokens: list[int], rid: int = 0, pos: int = 0) -> None:
    pol.begin_step(StepInfo(0, (rid,), (tuple(tokens),), (pos,), False))


def test_registered_and_warns_once_without_predictor() -> None:
    with pytest.warns(UserWarning, match="no routing predictor"):
        pol = make_policy("expertflow")
        pol.bind(8, L, E, K)
        pol.setup(PolicyContext())
    assert isinstance(pol, ExpertFlowPolicy) and pol.predictor is None and pol.source == "frequency"


def test_prefetches_predicted_experts_of_next_layers_in_order_of_need() -> None:
    truth = hot([[0, 1], [2, 3], [4, 5], [6, 7]])
    pol = policy(16, {7: truth}, trust=0.0, max_lookahead=3, prefetch_per_layer=0)
    step(pol, [7])
    pol.observe(0, np.array([[0, 1]]))
    pol.request(0, [0, 1])
    loads = pol.prefetch(0)
    keys = [ld.key for ld in loads]
    assert keys == [(1, 2), (1, 3), (2, 4), (2, 5), (3, 6), (3, 7)]  # max_lookahead = 3 layers
    assert all(ld.prefetch for ld in loads)
    pri = [ld.priority for ld in loads]
    assert pri == sorted(pri, reverse=True)  # nearer layer first
    for layer in (1, 2, 3):
        pol.observe(layer, truth[layer].nonzero()[0][None])
        plan = pol.request(layer, list(truth[layer].nonzero()[0]))
        assert plan.misses == 0
    assert pol.stats.prefetch_hits == 6


def test_mispredicted_prefetch_is_demoted_and_evicted_first() -> None:
    pred = hot([[0, 1], [2, 3], [4, 5], [6, 7]])
    pol = policy(6, {7: pred}, trust=0.0, max_lookahead=1)
    step(pol, [7])
    pol.observe(0, np.array([[0, 1]]))
    pol.request(0, [0, 1])
    assert {ld.key for ld in pol.prefetch(0)} == {(1, 2), (1, 3)}
    pol.observe(1, np.array([[2, 6]]))  # (1, 3) was a misprediction
    pol.request(1, [2, 6])
    assert pol.victim(list(pol.slot_of), 1) == (1, 3)


def test_finished_layers_give_their_slots_to_later_layers() -> None:
    # Slots hold layer 0's experts; after layer 0 ran, layer 1's predicted experts replace them.
    pred = hot([[0, 1], [2, 3], [4, 5], [6, 7]])
    pol = policy(4, {7: pred}, trust=0.0, max_lookahead=1)
    step(pol, [7])
    pol.observe(0, np.array([[0, 1]]))
    pol.request(0, [0, 1])
    pol.prefetch(0)
    pol.observe(1, np.array([[2, 3]]))
    pol.request(1, [2, 3])
    loads = pol.prefetch(1)  # the cache is full: layer 2's experts must evict layer 0's
    assert {ld.key for ld in loads} == {(2, 4), (2, 5)}
    assert {ld.evicted for ld in loads} == {(0, 0), (0, 1)}


def test_low_accuracy_shortens_the_lookahead() -> None:
    pol = policy(16, {}, max_lookahead=3, trust=0.5)
    pol.accuracy[:] = 0.95
    assert pol.horizon(0) == [1, 2, 3]
    pol.accuracy[2] = 0.6  # 0.6 ** 2 < 0.5: layer 2 is not trusted two layers ahead
    assert pol.horizon(0) == [1] and pol.horizon(1) == [2, 3]


def test_accuracy_tracks_the_predictor() -> None:
    right, wrong = hot([[0, 1]] * 4), hot([[6, 7]] * 4)
    good, bad = policy(16, {1: right}), policy(16, {1: wrong})
    for pol in (good, bad):
        for pos in range(20):
            step(pol, [1], pos=pos)
            for layer in range(L):
                pol.observe(layer, np.array([[0, 1]]))
                pol.request(layer, [0, 1])
                pol.prefetch(layer)
            pol.end_step()
    assert good.accuracy.min() > 0.85 and bad.accuracy.max() < 0.15


def test_quotas_follow_predicted_demand() -> None:
    wide = np.zeros((L, E), np.float32)
    wide[0, :2] = 1.0
    wide[1, :6] = 1.0  # layer 1 needs three times as many experts as layer 2
    wide[2, :2] = 1.0
    pol = policy(16, {3: wide})
    pol.accuracy[:] = 1.0
    step(pol, [3])
    q = pol.quotas([1, 2])
    assert q[1] == 12 and q[2] == 4


def test_previous_token_routing_is_passed_after_a_complete_step() -> None:
    pol = policy(16, {})
    step(pol, [5, 6], pos=0)  # prefill: no previous routing
    for layer in range(L):
        pol.observe(layer, np.array([[0, 1], [2, 3]]))
    pol.end_step()
    step(pol, [9], pos=2)
    calls = pol.predictor.calls  # type: ignore[attr-defined]
    assert calls == [((5, 6), False), ((9,), True)]
    assert pol.forecast.requests[0].prev is not None and pol.forecast.requests[0].prev[:, [2, 3]].all()


def test_wrong_shape_predictor_is_refused() -> None:
    pol = ExpertFlowPolicy()
    pol.bind(8, L, E, K)
    with pytest.raises(MoeflowError, match="layers"):
        pol.setup(PolicyContext(options={"predictor": TablePredictor({}, shape=(L + 1, E))}))


def random_trace(requests: int, prefill: int, decode: int, seed: int = 0) -> Trace:
    """Random routing; token id = row index, so a table keyed by token is an oracle."""
    rng = np.random.default_rng(seed)
    n = requests * (prefill + decode)
    experts = np.stack([np.stack([rng.choice(E, K, replace=False) for _ in range(L)]) for _ in range(n)])
    req = np.repeat(np.arange(requests), prefill + decode)
    pos = np.tile(np.arange(prefill + decode), requests)
    dec = np.tile(np.arange(prefill + decode) >= prefill, requests)
    return Trace(
        "rand", E, K, req, pos, dec, np.arange(n), np.arange(n), experts, np.ones(experts.shape, np.float32)
    )


@pytest.mark.parametrize("batch, slots", [(1, L * E // 4), (4, L * E // 2)])
def test_oracle_predictor_beats_belady_in_the_simulator(batch: int, slots: int) -> None:
    # Enough slots to hold the layer running and the next one: every layer but the first is prefetched.
    trace = random_trace(6, 3, 20)
    table = {int(t): hot([list(r) for r in trace.experts[i]]) for i, t in enumerate(trace.token)}
    oracle = simulate(
        trace, "expertflow", slots, batch, options={"predictor": TablePredictor(table), "trust": 0.0}
    )
    belady = simulate(trace, "belady", slots, batch)
    assert oracle.hit_ratio > belady.hit_ratio
    assert oracle.hit_ratio >= (L - 1) / L - 0.05  # only layer 0 cannot be prefetched


def test_runs_in_the_simulator_without_a_predictor() -> None:
    trace = random_trace(4, 3, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = simulate(trace, "expertflow", L * E // 2, 2)
    assert res.hits + res.misses == sum(
        len(np.unique(trace.experts[st_rows][:, layer]))
        for st_rows in _step_rows(trace, 2)
        for layer in range(L)
    )
    assert 0.0 < res.hit_ratio < 1.0


def _step_rows(trace: Trace, batch: int):
    from moeflow.sim.simulator import schedule

    return [st.rows for st in schedule(trace, batch)]


def test_engine_loads_the_predictor_beside_the_model_and_keeps_outputs(checkpoints, tmp_path) -> None:
    import shutil

    from moeflow import LLM, SamplingParams
    from moeflow.routing.predictor import default_path, save_predictor
    from moeflow.routing.predictor_train import TrainConfig, train_predictor

    model = tmp_path / "olmoe"
    shutil.copytree(checkpoints["olmoe"], model)
    prompts = ["a b c", "hello there", "one two three four"]
    params = SamplingParams(max_tokens=6, temperature=0.0)
    rec = LLM(model, device="cpu", num_slots=4, record_trace=True, progress=False)
    want = [o.token_ids for o in rec.generate(prompts, params)]
    net, vocab, info = train_predictor(
        [rec.trace()], TrainConfig(hidden=16, emb_dim=8, max_epochs=2), progress=False
    )
    save_predictor(default_path(model), net, vocab, info)
    llm = LLM(model, device="cpu", num_slots=4, policy="expertflow", progress=False)
    assert llm.runtime.policy.source == str(default_path(model))
    assert [o.token_ids for o in llm.generate(prompts, params)] == want
    assert llm.runtime.policy.stats.hits + llm.runtime.policy.stats.misses > 0


def test_prefetch_budget_caps_loads_per_step() -> None:
    # Every expert of every layer is predicted; the budget (1 per layer) spreads L loads over the step.
    everything = np.ones((L, E), np.float32)
    pol = policy(L * E, {7: everything}, trust=0.0, max_lookahead=3, prefetch_per_layer=1.0)
    step(pol, [7])
    issued = []
    for layer in range(L):
        pol.observe(layer, np.array([[0, 1]]))
        pol.request(layer, [0, 1])
        issued.append(len(pol.prefetch(layer)))
    assert sum(issued) == L and issued[0] == 2  # ceil(4 / 3) on the first call
    unlimited = policy(L * E, {7: everything}, trust=0.0, max_lookahead=3, prefetch_per_layer=0)
    step(unlimited, [7])
    unlimited.observe(0, np.array([[0, 1]]))
    unlimited.request(0, [0, 1])
    assert len(unlimited.prefetch(0)) == 3 * E


def test_prefetch_budget_follows_measured_timing_unless_given() -> None:
    pol = policy(L * E)
    pol.on_timing(layer_s=2e-3, copy_s=0.5e-3)  # one layer's compute hides 4 copies
    assert pol.prefetch_per_layer == pytest.approx(4.0)
    pol.on_timing(layer_s=1e-3, copy_s=0.5e-3)  # later measurements are smoothed
    assert 2.0 < pol.prefetch_per_layer < 4.0
    slow_link = policy(L * E)
    slow_link.on_timing(layer_s=1e-3, copy_s=1.0)  # still one copy per step
    assert slow_link.prefetch_per_layer == pytest.approx(1 / L)
    fixed = policy(L * E, prefetch_per_layer=3.0)
    fixed.on_timing(layer_s=2e-3, copy_s=0.5e-3)
    assert fixed.prefetch_per_layer == 3.0


def test_prefetch_before_the_first_layer_covers_layer_zero() -> None:
    pol = policy(L * E, {7: hot([[0, 1], [2, 3], [0, 1], [2, 3]])}, trust=0.0, min_prob=0.5)
    step(pol, [7])
    keys = {ld.key for ld in pol.prefetch(-1)}
    assert {(0, 0), (0, 1)} <= keys
