"""Decision logs of MoE-Infinity at OLMoE's shape (16 layers x 64 experts, top-8), decode batch 1 and 8, for the
speed-ups of its EAM matching (``routing.eam``, ``routing.eam_match``): on the demo evaluation trace
(``benchmarks/traces/demo-eval.npz``, 48 requests) against the collection built from the demo training trace
(``eamc-demo-train.npz``: 48 entries; as shipped, with room to grow, and capped at its 48 entries, so that every
admission replaces its nearest entry), and on synthetic skewed routing (``prefill_log.olmoe_trace``, 24 requests
decoding 40 tokens each) against collections of random EAMs (64 with room, and a full 1000). The ``alt`` cases
average the top-3 matches by similarity (the branch where the similarities' values, not only their order, reach
the decisions). What ``test_eam_decisions`` holds MoE-Infinity to; ``python -m tests.experts.policies.eam_log OUT``
writes the logs of the code on ``PYTHONPATH`` (run it on the commit a speed-up starts from)."""

from __future__ import annotations

import json
import sys
from functools import cache
from pathlib import Path

import numpy as np

from moeflow.routing.eam import EAMCollection
from moeflow.routing.trace import Trace
from tests.experts.policies.decision_log import decisions, digest
from tests.experts.policies.prefill_log import ALT, EXPERTS, LAYERS, SLOTS, olmoe_trace, probe

TRACES = Path(__file__).parents[3] / "benchmarks" / "traces"
CASES = [(t, c, b, "eager", o) for t, c in (("demo", "room"), ("demo", "full"), ("synthetic", "room"),
                                          ("synthetic", "full")) for b in (1, 8) for o in ("k1", "alt")]  # fmt: skip
CASES += [("demo", "full", 8, "static", "k1"), ("synthetic", "full", 8, "static", "k1")]
SYNTHETIC_PROMPTS = (50, 30, 20, 10, 40, 25, 60, 5) * 3


@cache
def demo_trace() -> Trace:
    return Trace.load(TRACES / "demo-eval.npz")


def collection(trace: str, kind: str) -> EAMCollection:
    """The collection a case starts from (a fresh one each call: the policy copies it anyway)."""
    if trace == "demo":
        eamc = EAMCollection.load(TRACES / "eamc-demo-train.npz", LAYERS, EXPERTS)
        if kind == "full":
            eamc.capacity = len(eamc)
        return eamc
    entries, capacity = (64, 128) if kind == "room" else (1000, 1000)
    eamc = EAMCollection(LAYERS, EXPERTS, capacity)
    eamc.extend(np.random.default_rng(3).poisson(0.5, (entries, LAYERS, EXPERTS)).astype(np.float32))
    return eamc


def eam_decisions(trace: str, kind: str, batch: int, execution: str, options: str) -> list:
    """The decision log of one case: every plan, load, victim and prefetch, and (``k1``: bit for bit, since the
    best match's rows are used as they are) the keep-scores each step starts from."""
    tr = demo_trace() if trace == "demo" else olmoe_trace(4, SYNTHETIC_PROMPTS, 40)
    opts = {"eamc": collection(trace, kind), **(ALT if options == "alt" else {})}
    return decisions(
        "moe-infinity", batch, execution, SLOTS, tr, None, probe if options == "k1" else None, opts
    )


def case_id(trace: str, kind: str, batch: int, execution: str, options: str) -> str:
    return f"{trace}/{kind}/{batch}/{execution}/{options}"


if __name__ == "__main__":
    out = {}
    for case in CASES:
        log = eam_decisions(*case)
        out[case_id(*case)] = {"digest": digest(log), "stats": log[-1][1:], "entries": len(log)}
        print(case_id(*case), out[case_id(*case)], flush=True)
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh, indent=1)
