"""The per-step prefetch budget: the step's remaining loads spread over the prefetch calls left, no limit at 0."""

from __future__ import annotations

import math

from moeflow.experts.policies.budget import call_budget


def test_no_limit_without_a_budget() -> None:
    assert call_budget(0.0, 8, 3, 2) == math.inf and call_budget(-1.0, 8, 0, -1) == math.inf


def test_what_is_left_is_spread_over_the_calls_left() -> None:
    assert call_budget(2.0, 8, 0, -1) == 2.0  # 16 loads over the 8 calls after layers -1..6
    assert call_budget(2.0, 8, 9, 4) == 3.0  # 7 left over the calls after layers 4, 5 and 6: ceil(7 / 3)
    assert call_budget(1.5, 4, 5, 2) == 1.0  # the last call gets what is left
    assert call_budget(1.0, 4, 6, 1) == -1.0  # overspent: negative, nothing more is issued
