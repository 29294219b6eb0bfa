"""The host-time speed-ups of ``expertflow-reuse`` change no decision: every plan, load, victim and prefetch (and, bit
for bit, the demands, estimates and request rates each step plans from) matches the log recorded from commit
e619717, before them (``data/decisions-e619717-reuse.json``, written by ``python -m tests.experts.policies.reuse_log``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.experts.policies.decision_log import digest
from tests.experts.policies.reuse_log import CASES, case_id, reuse_decisions

REFERENCE = json.loads((Path(__file__).parent / "data" / "decisions-e619717-reuse.json").read_text())


@pytest.mark.parametrize("case", CASES, ids=lambda c: case_id(*c))
def test_same_decisions_as_before(case: tuple[str, int, str, str]) -> None:
    log = reuse_decisions(*case)
    ref = REFERENCE[case_id(*case)]
    assert log[-1][1:] == ref["stats"]  # the counters first: a readable difference
    assert len(log) == ref["entries"] and digest(log) == ref["digest"]


def test_the_probe_sees_a_changed_rate() -> None:
    log = reuse_decisions("seeded", 4, "eager", "default")
    first = next(i for i, e in enumerate(log) if e[0] == "probe")
    log[first][5] = "0" * 16  # another digest of the request rates
    assert digest(log) != REFERENCE[case_id("seeded", 4, "eager", "default")]["digest"]


def test_the_cases_make_decisions() -> None:
    for case in CASES:
        ref = REFERENCE[case_id(*case)]
        hits, misses, prefetches = ref["stats"][:3]
        assert hits > 0 and misses > 0
        assert (prefetches > 0) == (case[3] == "prefetch")
