"""``RunningActivations.add_layers`` (a settled static step's routing, every layer at once) leaves the running
requests' counts, recency-weighted counts, own ratios, routed rows and rows to re-match exactly as ``add`` layer
by layer does, for one request and for several of unequal lengths, with padded (-1) ids."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.experts.policies.activations import RunningActivations

LAYERS, EXPERTS, K = 5, 16, 2


def _state(acts: RunningActivations) -> list[np.ndarray]:
    return [acts.counts, acts.recent, acts.own, acts.seen]


@pytest.mark.parametrize("lengths", [[3], [2, 1, 4]])
def test_add_layers_equals_add_layer_by_layer(lengths: list[int]) -> None:
    rng = np.random.default_rng(0)
    rids = list(range(len(lengths)))
    runs = [RunningActivations(LAYERS, EXPERTS) for _ in range(2)]
    for step in range(3):  # a few steps: recency decays, earlier rows are non-zero
        routing = rng.integers(0, EXPERTS, (LAYERS, sum(lengths), K))
        routing[:, 0, 1] = -1  # a padded pair
        for acts in runs:
            acts.begin_step(rids, 0.9, 0.5)
        for layer in range(LAYERS):
            runs[0].add(layer, routing[layer], lengths)
        runs[1].add_layers(routing, lengths)
        for a, b in zip(_state(runs[0]), _state(runs[1])):
            assert a.dtype == b.dtype and np.array_equal(a, b), step
        for rid in rids:
            assert runs[0].eams[rid]._dirty == runs[1].eams[rid]._dirty == set(range(LAYERS))
            assert np.shares_memory(
                runs[1].eams[rid].counts, runs[1].counts
            )  # still views of the step's rows
            runs[0].eams[rid]._dirty.clear()
            runs[1].eams[rid]._dirty.clear()


def test_add_layers_refuses_an_expert_out_of_range() -> None:
    acts = RunningActivations(LAYERS, EXPERTS)
    acts.begin_step([0], 0.9, 0.5)
    with pytest.raises(IndexError, match="out of range"):
        acts.add_layers(np.full((LAYERS, 1, K), EXPERTS), [1])
