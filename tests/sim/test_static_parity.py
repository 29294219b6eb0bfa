"""The simulator makes the engine's decisions: on a trace the engine recorded, replayed in the engine's own steps,
the simulator's static execution gives the static engine's hits, misses and evictions (batch 1 and 4), and its
eager execution the eager engine's."""

from __future__ import annotations

from pathlib import Path

import pytest

from moeflow import LLM, SamplingParams
from moeflow.sim import simulate

PROMPTS = [[5, 17, 42, 7, 99, 3], [250, 11, 64, 8], [9, 8, 7, 6, 5, 4, 3, 2], [12, 13], [40, 41, 42, 43, 44]]


@pytest.mark.parametrize("decode", ["static", "eager"])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("policy", ["lru", "lfu"])
def test_simulator_matches_engine(checkpoints: dict[str, Path], decode: str, batch: int, policy: str) -> None:
    llm = LLM(checkpoints["olmoe"], device="cpu", num_slots=5, policy=policy, decode=decode, batch_size=batch,
              record_trace=True, schedule="fifo", progress=False)  # fmt: skip
    llm.generate(PROMPTS, SamplingParams(max_tokens=6, ignore_eos=True))
    stats = llm.policy.stats
    sim = simulate(llm.trace(), policy, 5, batch, execution=decode, batching="recorded")
    assert (sim.hits, sim.misses, sim.evictions) == (stats.hits, stats.misses, stats.evictions)
    assert sim.hits > 0 and sim.misses > 0 and sim.evictions > 0
