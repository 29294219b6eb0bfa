"""Byte-aware prefetch: the link model's costs, and what the rule does to MoE-Infinity's and ExpertFlow's copies."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.experts.policies.link import LinkLedger
from moeflow.sim import TimingModel, simulate
from tests.experts.policies.decision_log import seeded_trace, tiny_predictor


def test_a_copy_the_compute_hides_is_free_and_a_late_one_costs_its_lateness() -> None:
    link = LinkLedger(layer_s=1.0, copy_s=2.0)
    assert link.link_cost(0, 4) == 0.0  # starts at 0 s, lands at 2 s, needed at 4 s
    assert link.link_cost(2, 3) == 1.0  # lands at 4 s, needed at 3 s
    link.queue(0)
    link.queue(0)  # the link is busy until 4 s
    assert link.link_cost(0, 1) == 2.0  # lands at 6 s, needed at 1 s: capped at one copy (what a miss costs)
    assert link.link_cost(3, 7) == 0.0 and link.link_cost(-1, 5) == 1.0


def test_worth_weighs_use_against_the_victim_and_the_link() -> None:
    link = LinkLedger(layer_s=1.0, copy_s=2.0)
    assert link.worth(0.6, 0.0, 0, 4) and not link.worth(0.3, 0.4, 0, 4)  # hidden: use beats the victim
    assert not link.worth(0.4, 0.0, 3, 4)  # lands 1 s late (half a copy): saves only 0.4 of a copy
    assert link.worth(0.9, 0.0, 3, 4)  # the same lateness, but likely enough to pay
    assert link.refused == 2
    assert LinkLedger().worth(0.0, 1.0, 0, 1)  # no timing known: the policy's own rules decide


@pytest.mark.parametrize("policy", ["moe-infinity", "expertflow"])
def test_byte_aware_copies_less_and_nothing_when_the_link_cannot_hide_a_copy(policy: str) -> None:
    trace = seeded_trace()
    opts = {"predictor": tiny_predictor(), "prefetch_per_layer": 3.0}

    def prefetches(copy_s: float, byte_aware: bool) -> int:
        timing = TimingModel(expert_bytes=int(copy_s * 1e9), bandwidth=1e9, compute_per_layer=1e-3)
        res = simulate(trace, policy, 24, 2, timing=timing, options={**opts, "byte_aware": byte_aware})
        return res.prefetches

    cheap = prefetches(1e-5, True)
    assert 0 < cheap <= prefetches(1e-5, False)
    assert prefetches(1.0, True) == 0 < prefetches(1.0, False)
    assert np.isfinite(cheap)
