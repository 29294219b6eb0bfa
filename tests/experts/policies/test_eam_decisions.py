"""The EAM matching speed-ups (a step's requests matched at once, layer-major dot products) change no decision of MoE-Infinity: every
plan, load, victim and prefetch (and, with one match, the keep-scores bit for bit) on the demo evaluation trace and
on synthetic routing, at decode batch 1 and 8, matches the log recorded from commit 34f8609, before them
(``data/decisions-34f8609-eam.json``, written by ``python -m tests.experts.policies.eam_log``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experts.policies.decision_log import digest
from tests.experts.policies.eam_log import CASES, case_id, eam_decisions

REFERENCE = json.loads((Path(__file__).parent / "data" / "decisions-34f8609-eam.json").read_text())


def _param(case: tuple) -> object:
    slow = case[0] == "demo" and case[2] == 1  # the demo trace one request at a time: ~20 s a case
    return pytest.param(case, id=case_id(*case), marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_same_decisions_as_before(case: tuple[str, str, int, str, str]) -> None:
    log = eam_decisions(*case)
    ref = REFERENCE[case_id(*case)]
    assert log[-1][1:] == ref["stats"]  # the counters first: a readable difference
    assert len(log) == ref["entries"] and digest(log) == ref["digest"]


def test_the_log_sees_a_changed_keep_score() -> None:
    log = eam_decisions("synthetic", "room", 8, "eager", "k1")
    first = next(i for i, e in enumerate(log) if e[0] == "probe" and e[1] != "-")
    log[first][1] = "0" * 16  # another keep-score digest
    assert digest(log) != REFERENCE[case_id("synthetic", "room", 8, "eager", "k1")]["digest"]
