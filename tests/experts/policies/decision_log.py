"""A seeded routing trace, a tiny random routing predictor, and the log of every decision a policy makes on them
(plans, demand loads, prefetches, victims), as the simulator drives it: what ``test_decisions_unchanged`` holds the
policies to. ``python -m tests.experts.policies.decision_log OUT`` writes the log of the code on ``PYTHONPATH``
(run it on the commit a speed-up starts from to record the reference)."""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable

import numpy as np

from moeflow.experts.cache import CachePolicy, PolicyContext
from moeflow.experts.policies import make_policy
from moeflow.routing.predictor import PredictorConfig, RoutingPredictor
from moeflow.routing.trace import Trace
from moeflow.sim.simulator import layer_requests, schedule
from moeflow.sim.static import StaticSteps

LAYERS, EXPERTS, TOP_K = 6, 16, 2
CASES = [
    (name, batch, "eager")
    for name in ("lru", "lfu", "moe-infinity", "expertflow", "belady")
    for batch in (1, 4)
]
CASES += [(name, 4, "static") for name in ("lru", "moe-infinity", "expertflow")]


def seeded_trace(seed: int = 0, requests: int = 8) -> Trace:
    """Skewed routing (a few popular experts per layer, drifting per request): prefill 3-12 tokens, 6-14 decode."""
    rng = np.random.default_rng(seed)
    req, pos, dec, rows = [], [], [], []
    for rid in range(requests):
        p, d = int(rng.integers(3, 13)), int(rng.integers(6, 15))
        pref = rng.dirichlet(np.full(EXPERTS, 0.3), size=LAYERS)  # [L, E] this request's preferences
        for t in range(p + d):
            rows.append([rng.choice(EXPERTS, TOP_K, replace=False, p=pref[ly]) for ly in range(LAYERS)])
            req.append(rid), pos.append(t), dec.append(t >= p)
    n = len(req)
    experts = np.asarray(rows, np.int16)
    return Trace("seeded", EXPERTS, TOP_K, np.array(req), np.array(pos), np.array(dec), np.arange(n),
                 rng.integers(0, 50, n), experts, np.ones(experts.shape, np.float32))  # fmt: skip


def tiny_predictor(seed: int = 1) -> RoutingPredictor:
    cfg = PredictorConfig(LAYERS, EXPERTS, TOP_K, vocab_size=11, emb_dim=8, hidden=8)
    rng = np.random.default_rng(seed)
    h, d, le = cfg.hidden, cfg.emb_dim, LAYERS * EXPERTS
    shapes = {"emb.weight": (11, d), "gru.weight_ih_l0": (3 * h, d), "gru.weight_hh_l0": (3 * h, h),
              "gru.bias_ih_l0": (3 * h,), "gru.bias_hh_l0": (3 * h,), "mix.weight": (h, h + d), "mix.bias": (h,),
              "prev.weight": (h, le), "out.weight": (le, h), "out.bias": (le,)}  # fmt: skip
    return RoutingPredictor(cfg, np.arange(0, 50, 5), {k: rng.normal(0, 0.7, s) for k, s in shapes.items()})


def _loads(loads: object) -> list:
    return [[*ld.key, ld.slot, *(ld.evicted or (-1, -1)), int(ld.prefetch)] for ld in loads]  # type: ignore[attr-defined]


def decisions(
    name: str,
    batch: int,
    execution: str,
    slots: int = 24,
    trace: Trace | None = None,
    predictor: object | None = "tiny",
    probe: Callable[[CachePolicy], list] | None = None,
    options: dict | None = None,
) -> list:
    """Every plan and prefetch ``name`` makes on ``trace`` (default: the seeded trace, with the tiny predictor), in
    order; ``probe(policy)``, when given, adds what it returns after each step's ``begin_step``; ``options`` are
    added to the policy's."""
    trace = seeded_trace() if trace is None else trace
    layers = trace.experts.shape[1]
    pol: CachePolicy = make_policy(name)
    pol.bind(slots, layers, trace.num_experts, trace.top_k)
    opts = {"batch_size": batch, "prefetch_per_layer": 1.5}
    if predictor is not None:
        opts["predictor"] = tiny_predictor() if predictor == "tiny" else predictor
    opts.update(options or {})
    pol.setup(PolicyContext(trace=trace, options=opts))
    log: list = []
    static = StaticSteps(pol)
    for st in schedule(trace, batch):
        ex, w = trace.experts[st.rows], trace.weights[st.rows]
        if execution == "static" and not st.info.prefill:
            static.run(st.info, ex)
            log.append(["static", pol.key_in.copy()])
        else:
            pol.begin_step(st.info)
            if probe is not None:
                log.append(["probe", *probe(pol)])
            log.append(["pre", _loads(pol.prefetch(-1))])
            for layer in range(layers):
                pol.observe(layer, ex[:, layer], w[:, layer])
                for chunk in layer_requests(ex[:, layer], pol.num_slots):
                    plan = pol.request(layer, chunk)
                    log.append(["plan", list(plan.slots), _loads(plan.loads)])
                log.append(["fetch", _loads(pol.prefetch(layer))])
            pol.end_step()
        for rid in st.ended:
            getattr(pol, "end_request", lambda r: None)(rid)
    pol.finish()
    s = pol.stats
    log.append(["stats", s.hits, s.misses, s.prefetches, s.prefetch_hits, s.prefetch_wasted, s.evictions])
    return json.loads(json.dumps(log, default=lambda o: o if not isinstance(o, np.integer) else int(o)))


def digest(log: list) -> str:
    return hashlib.sha256(json.dumps(log).encode()).hexdigest()


def summary(name: str, batch: int, execution: str) -> dict:
    log = decisions(name, batch, execution)
    return {"digest": digest(log), "stats": log[-1][1:], "entries": len(log)}


if __name__ == "__main__":
    out = {f"{n}/{b}/{x}": summary(n, b, x) for n, b, x in CASES}
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh, indent=1)
    print(json.dumps(out, indent=1))
