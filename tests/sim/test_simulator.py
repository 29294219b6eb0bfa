"""The simulator's schedule, the calls it makes on policies, its counts, the time model and the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pytest

from moeflow.cli import main
from moeflow.experts.cache import PolicyContext, StepInfo
from moeflow.experts.policies.classic import LRUPolicy
from moeflow.routing.trace import Trace
from moeflow.sim import TimingModel, schedule, simulate
from moeflow.sim.simulator import access_sequence, layer_requests


def make_trace(requests: list[tuple[int, int]], experts: np.ndarray, num_experts: int) -> Trace:
    """``requests``: (prefill tokens, decode tokens) per request; ``experts`` [N, L, K] rows in that order."""
    req, pos, dec = [], [], []
    for rid, (p, d) in enumerate(requests):
        req += [rid] * (p + d)
        pos += list(range(p + d))
        dec += [False] * p + [True] * d
    n = len(req)
    assert experts.shape[0] == n
    return Trace("test", num_experts, experts.shape[2], np.array(req), np.array(pos), np.array(dec),
                 np.arange(n), 100 + np.arange(n), experts, np.ones(experts.shape, np.float32))  # fmt: skip


def test_schedule_batch_1_runs_requests_one_after_another() -> None:
    trace = make_trace([(3, 2), (2, 1)], np.zeros((8, 1, 1), int), 2)
    steps = schedule(trace, 1)
    assert [(s.info.request_ids, s.info.prefill, len(s.rows)) for s in steps] == [
        ((0,), True, 3), ((0,), False, 1), ((0,), False, 1), ((1,), True, 2), ((1,), False, 1)
    ]  # fmt: skip
    assert steps[0].info.token_ids == ((100, 101, 102),) and steps[1].info.positions == (3,)
    assert [s.ended for s in steps] == [(), (), (0,), (), (1,)]


def test_schedule_batch_interleaves_decode_steps() -> None:
    trace = make_trace([(2, 3), (1, 1), (1, 2)], np.zeros((10, 1, 1), int), 2)
    steps = schedule(trace, 2)
    got = [(s.info.request_ids, s.info.prefill) for s in steps]
    assert got == [
        ((0,), True), ((1,), True), ((0, 1), False),  # request 1 finishes here
        ((2,), True), ((0, 2), False), ((0, 2), False),
    ]  # fmt: skip
    assert steps[2].rows.tolist() == [2, 6] and steps[2].ended == (1,)
    assert steps[-1].ended == (0, 2)
    assert sum(len(s.rows) for s in steps) == trace.num_tokens


def test_layer_requests_chunks_distinct_experts() -> None:
    assert layer_requests(np.array([[3, 1], [1, 5], [-1, 3]]), 2) == [[1, 3], [5]]


@dataclass
class Recorder(LRUPolicy):
    calls: list = field(default_factory=list)

    def setup(self, context: PolicyContext) -> None:
        self.calls.append(("setup", context.trace is not None, dict(context.options)))

    def begin_step(self, info: StepInfo) -> None:
        self.calls.append(("begin", info.request_ids))

    def observe(self, layer, experts, weights=None) -> None:
        self.calls.append(("observe", layer, experts.tolist()))

    def request(self, layer, experts):
        self.calls.append(("request", layer, list(experts)))
        return super().request(layer, experts)

    def prefetch(self, layer):
        self.calls.append(("prefetch", layer))
        return []

    def end_step(self) -> None:
        self.calls.append(("end_step",))

    def end_request(self, rid: int) -> None:
        self.calls.append(("end_request", rid))

    def finish(self) -> None:
        self.calls.append(("finish",))
        super().finish()


def test_simulate_makes_the_engine_calls_in_order() -> None:
    experts = np.array(
        [[[0, 1], [2, 3]], [[1, 2], [3, 0]]]
    )  # [N=2, L=2, K=2]: one prefill + one decode token
    trace = make_trace([(1, 1)], experts, 4)
    pol = Recorder()
    simulate(trace, pol, 3, options={"x": 1})
    assert pol.calls == [
        ("setup", True, {"batch_size": 1, "x": 1}),
        ("begin", (0,)), ("prefetch", -1),
        ("observe", 0, [[0, 1]]), ("request", 0, [0, 1]), ("prefetch", 0),
        ("observe", 1, [[2, 3]]), ("request", 1, [2, 3]), ("prefetch", 1),
        ("end_step",),
        ("begin", (0,)), ("prefetch", -1),
        ("observe", 0, [[1, 2]]), ("request", 0, [1, 2]), ("prefetch", 0),
        ("observe", 1, [[3, 0]]), ("request", 1, [0, 3]), ("prefetch", 1),
        ("end_step",), ("end_request", 0), ("finish",),
    ]  # fmt: skip


def test_lru_counts_on_a_known_sequence() -> None:
    seq = [0, 1, 0, 2, 0, 1]  # 2 slots, LRU: miss miss hit miss hit miss
    trace = make_trace([(0, len(seq))], np.array(seq).reshape(-1, 1, 1), 3)
    res = simulate(trace, "lru", 2, expert_bytes=10)
    assert (res.hits, res.misses, res.loads, res.bytes_moved) == (2, 4, 4, 40)
    assert res.hit_ratio == pytest.approx(2 / 6) and res.cache_fraction == pytest.approx(2 / 3)


def test_more_experts_than_slots_are_requested_in_chunks() -> None:
    experts = np.array([[[0, 1]], [[2, 3]]])  # batch of 2 tokens needs 4 experts, 1 slot
    trace = make_trace([(0, 1), (0, 1)], experts, 4)
    res = simulate(trace, "lru", 1, batch_size=2)
    assert res.misses == 4 and res.hits == 0 and res.steps == 1
    assert access_sequence(trace, 2, 1) == [(0, 0), (0, 1), (0, 2), (0, 3)]


def test_timing_model_formula() -> None:
    tm = TimingModel(
        expert_bytes=10**9, bandwidth=10**9, compute_per_layer=0.5
    )  # 1 s per expert, 1 s/step compute
    times = tm.step_times(2, demand=np.array([0, 1, 2]), prefetch=np.array([3, 0, 1]))
    assert times.tolist() == [3.0, 2.0, 3.0]
    s = tm.summary(
        2, np.array([0, 1, 2]), np.array([3, 0, 1]), np.array([5, 1, 1]), np.array([True, False, False])
    )
    assert s["time_per_token_s"] == pytest.approx(2.5) and s["prefill_time_s"] == pytest.approx(3.0)
    assert s["transfer_time_s"] == pytest.approx(7.0) and s["transfer_hidden_share"] == pytest.approx(2 / 7)


def test_simulate_timing_counts_prefetch_overlap() -> None:
    trace = make_trace([(0, 2)], np.array([[[0], [1]], [[0], [1]]]), 2)
    tm = TimingModel(expert_bytes=100, bandwidth=100.0, compute_per_layer=0.25)
    res = simulate(trace, "lru", 4, timing=tm)  # step 1: 2 demand misses, step 2: all hits
    assert res.timing["time_per_token_s"] == pytest.approx((0.5 + 2.0 + 0.5) / 2)


def test_cli_simulate_json_plot_and_options(tmp_path, capsys) -> None:
    rng = np.random.default_rng(0)
    trace = make_trace([(4, 6), (3, 5)], rng.integers(0, 4, size=(18, 3, 2)), 4)
    path = tmp_path / "t.npz"
    trace.save(path)
    png, out = tmp_path / "p.png", tmp_path / "r.json"
    rc = main(["simulate", "--trace", str(path), "--cache-size", "25%", "6", "--batch-size", "1", "2",
               "--policy", "lru,belady,moe-infinity", "--expert-bytes", "1MiB", "--eamc-from", str(path),
               "--option", "max_prefetch=1", "--json", "--plot", str(png), "--out", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc == json.loads(out.read_text())
    assert len(doc["results"]) == 2 * 2 * 3
    assert {r["cache_slots"] for r in doc["results"]} == {3, 6}
    assert all(r["bytes_moved"] == r["loads"] * 2**20 for r in doc["results"])
    assert all(r["options"] == {"max_prefetch": 1} for r in doc["results"])
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_cli_simulate_static_overlap(tmp_path, capsys) -> None:
    """``--execution static-overlap`` runs the lagged plans: the same hits and misses as ``simulate`` with it."""
    rng = np.random.default_rng(1)
    trace = make_trace([(4, 8), (3, 9)], rng.integers(0, 6, size=(24, 3, 2)), 6)
    path = tmp_path / "t.npz"
    trace.save(path)
    rc = main(["simulate", "--trace", str(path), "--cache-size", "5", "--batch-size", "2", "--policy", "lru",
               "--execution", "static-overlap", "--json"])  # fmt: skip
    assert rc == 0
    (got,) = json.loads(capsys.readouterr().out)["results"]
    want = simulate(trace, "lru", 5, 2, execution="static-overlap")
    assert (got["hits"], got["misses"]) == (want.hits, want.misses) and want.misses > 0


def test_cli_rejects_bad_input(tmp_path, capsys) -> None:
    assert main(["simulate", "--trace", str(tmp_path / "none.npz"), "--cache-size", "4"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_eamc_build(tmp_path, capsys) -> None:
    from moeflow.routing.eam import EAMCollection

    trace = make_trace([(2, 2), (1, 3)], np.random.default_rng(1).integers(0, 4, size=(8, 3, 2)), 4)
    trace.save(tmp_path / "t.npz")
    assert main(["eamc", "build", "--traces", str(tmp_path / "t.npz"), "--out", str(tmp_path / "e.npz")]) == 0
    c = EAMCollection.load(tmp_path / "e.npz", 3, 4)
    assert len(c) == 2 and c.entries.sum() == 8 * 3 * 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_registered_policy_replays_without_special_casing() -> None:
    from moeflow.experts.cache import POLICIES
    from moeflow.experts.policies import make_policy

    make_policy("lru")  # loads the plug-in policies
    rng = np.random.default_rng(3)
    trace = make_trace([(3, 5), (2, 6), (4, 4)], rng.integers(0, 6, size=(24, 3, 2)), 6)
    for name in sorted(POLICIES):
        for batch in (1, 2):
            res = simulate(trace, name, 5, batch)
            assert res.hits + res.misses == len(access_sequence(trace, batch, 5)), name
            assert res.loads >= simulate(trace, "belady", 5, batch).misses, name


@dataclass
class _ForecastLog(LRUPolicy):
    """Logs each forecast and each prefetch call, in order."""

    log: list = field(default_factory=list)

    def observe_forecast(self, forecast) -> None:
        self.log.append(("forecast", forecast.layer, forecast.distance, forecast.scores.copy()))

    def prefetch(self, layer: int) -> list:
        self.log.append(("prefetch", layer))
        return []


@pytest.mark.parametrize("distance", [1, 2])
def test_forecasts_reach_the_policy_before_the_prefetch_distance_layers_ahead(distance: int) -> None:
    experts = np.zeros((3, 3, 1), int)
    trace = make_trace([(2, 1)], experts, 2)
    forecast = np.arange(3 * 3 * 2, dtype=np.float32).reshape(3, 3, 2)
    pol = _ForecastLog()
    simulate(trace, lambda: pol, cache_size=2, forecast=forecast, forecast_distance=distance)
    early = [
        entry for layer in range(distance) for entry in (("forecast", layer, layer + 1), ("prefetch", -1))
    ]
    late = [entry for layer in range(3) for entry in
            ([("forecast", layer + distance, distance)] if layer + distance < 3 else []) + [("prefetch", layer)]]  # fmt: skip
    assert [e[:3] for e in pol.log] == (early + late) * 2  # the prefill step, then the decode step
    got = next(e for e in pol.log if e[0] == "forecast" and e[1] == distance)
    assert np.array_equal(got[3], forecast[[0, 1], distance])  # the step's rows of the forecast layer
