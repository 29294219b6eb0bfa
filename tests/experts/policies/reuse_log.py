"""Decision logs of ExpertFlow with request-level reuse (``expertflow-reuse``): on the seeded trace of
``decision_log`` (6 layers x 16 experts, top-2, tiny predictor) and on OLMoE-shaped decode-heavy routing
(``prefill_log``: 16 x 64, top-8, a random predictor of that shape), eager and static, with its defaults and with
the other branches of its options (bypass, no vacate, request prior, prefetching on, undecayed counts). The probe
adds, bit for bit, what each step plans from (its demands, next-step estimate, step frequency and request rates).
What ``test_reuse_decisions`` holds the policy to; ``python -m tests.experts.policies.reuse_log OUT`` writes the logs
of the code on ``PYTHONPATH`` (run it on the commit a speed-up starts from)."""

from __future__ import annotations

import json
import sys

from moeflow.experts.cache import CachePolicy
from tests.experts.policies.decision_log import decisions, digest
from tests.experts.policies.prefill_log import (
    DECODE_PROMPTS,
    DECODE_TOKENS,
    SLOTS,
    _sha,
    olmoe_predictor,
    olmoe_trace,
)

OPTIONS = {
    "default": {},
    "bypass": {"bypass": 1.0, "vacate": 0.0, "req_prior": 1.0},
    "prefetch": {"min_prob": 0.3},
    "whole": {"req_decay": 1.0, "next_weight": 0.0},
}
CASES = [
    ("seeded", b, x, o) for b, x in ((1, "eager"), (4, "eager"), (4, "static")) for o in ("default", "whole")
]
CASES += [("seeded", 4, x, o) for x in ("eager", "static") for o in ("bypass", "prefetch")]
CASES += [("olmoe", 4, x, o) for x in ("eager", "static") for o in ("default", "bypass", "prefetch")]


def probe(pol: CachePolicy) -> list:
    """What a step plans from, bit for bit."""
    names = ("accuracy", "_demand", "_next", "_fstep", "_q", "freq")
    return [_sha(getattr(pol, n)) for n in names]


def reuse_decisions(trace: str, batch: int, execution: str, options: str) -> list:
    """The decision log of one case."""
    opts = OPTIONS[options]
    if trace == "seeded":
        return decisions("expertflow-reuse", batch, execution, probe=probe, options=opts)
    tr = olmoe_trace(1, DECODE_PROMPTS, DECODE_TOKENS)
    return decisions("expertflow-reuse", batch, execution, SLOTS, tr, olmoe_predictor("random"), probe, opts)


def case_id(trace: str, batch: int, execution: str, options: str) -> str:
    return f"{trace}/{batch}/{execution}/{options}"


if __name__ == "__main__":
    out = {}
    for case in CASES:
        log = reuse_decisions(*case)
        out[case_id(*case)] = {"digest": digest(log), "stats": log[-1][1:], "entries": len(log)}
        print(case_id(*case), out[case_id(*case)], flush=True)
    with open(sys.argv[1], "w") as fh:
        json.dump(out, fh, indent=1)
