"""The host-time speed-ups change no decision: every policy's plans, loads, victims and prefetches on a seeded trace
(with a tiny random routing predictor) match the log recorded from commit 134857c, before them
(``data/decisions-134857c.json``, written by ``python -m tests.experts.policies.decision_log``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experts.policies.decision_log import CASES, decisions, digest

REFERENCE = json.loads((Path(__file__).parent / "data" / "decisions-134857c.json").read_text())


@pytest.mark.parametrize(("name", "batch", "execution"), CASES)
def test_same_decisions_as_before_the_speed_ups(name: str, batch: int, execution: str) -> None:
    log = decisions(name, batch, execution)
    ref = REFERENCE[f"{name}/{batch}/{execution}"]
    assert log[-1][1:] == ref["stats"]  # the counters first: a readable difference
    assert len(log) == ref["entries"] and digest(log) == ref["digest"]


def test_the_log_sees_a_changed_decision() -> None:
    log = decisions("lru", 1, "eager")
    plan = next(i for i, e in enumerate(log) if e[0] == "plan" and e[2])
    log[plan][2][0][2] += 1  # another slot for one load
    assert digest(log) != REFERENCE["lru/1/eager"]["digest"]
