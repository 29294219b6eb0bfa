"""The prefill and decode speed-ups of ExpertFlow and MoE-Infinity change no decision: every plan, load, victim and
prefetch (and, bit for bit, ExpertFlow's accuracies and demands and MoE-Infinity's keep-scores) on OLMoE-shaped
long prefills matches the log recorded from commit 5998c41, before them (``data/decisions-5998c41-olmoe.json``,
written by ``python -m tests.experts.policies.prefill_log``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experts.policies.decision_log import digest
from tests.experts.policies.prefill_log import CASES, case_id, prefill_decisions

REFERENCE = json.loads((Path(__file__).parent / "data" / "decisions-5998c41-olmoe.json").read_text())


@pytest.mark.filterwarnings("ignore:expertflow. no routing predictor")
@pytest.mark.parametrize("case", CASES, ids=lambda c: case_id(*c))
def test_same_decisions_as_before(case: tuple[str, int, str, str]) -> None:
    log = prefill_decisions(*case)
    ref = REFERENCE[case_id(*case)]
    assert log[-1][1:] == ref["stats"]  # the counters first: a readable difference
    assert len(log) == ref["entries"] and digest(log) == ref["digest"]


def test_the_probe_sees_a_changed_accuracy() -> None:
    log = prefill_decisions("expertflow", 1, "eager", "random")
    probe = next(i for i, e in enumerate(log) if e[0] == "probe")
    log[probe][1] = "0" * 16  # another accuracy digest
    assert digest(log) != REFERENCE[case_id("expertflow", 1, "eager", "random")]["digest"]
