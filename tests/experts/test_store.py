"""The store's prefetch queue: stale prefetches are dropped and their slots freed, a queued prefetch that a layer
needs jumps the queue, and a slot taken by a newer load drops the queued copy. The disk-reader thread is held
busy so that queued prefetches stay unstarted and every case is deterministic."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from moeflow import LLM
from moeflow.experts.cache import Load
from moeflow.experts.layer import StepContext
from moeflow.experts.store import ExpertStore


@pytest.fixture()
def llm(checkpoints: dict[str, Path]) -> Iterator[LLM]:
    engine = LLM(checkpoints["olmoe"], device="cpu", num_slots=6, progress=False)
    yield engine
    engine.close()


def expert(store: ExpertStore, layer: int, e: int) -> torch.Tensor:
    out = torch.empty_like(store.slots[0])
    store.loaded.read_expert(layer, e, out)
    return out


def hold_reader(store: ExpertStore) -> threading.Event:
    """Occupy the single disk-reader thread until the returned event is set."""
    gate, started = threading.Event(), threading.Event()
    store._reader.submit(lambda: (started.set(), gate.wait(10)))
    assert started.wait(10)
    return gate


def test_stale_prefetch_is_dropped_and_its_slot_freed(llm: LLM) -> None:
    rt, store, policy = llm.runtime, llm.store, llm.policy  # the default policy: LRU
    early = policy.admit((0, 1), priority=2.0)
    later = policy.admit((1, 2), priority=1.0)
    assert early is not None and later is not None
    gate = hold_reader(store)
    rt.ctx = StepContext(step=5)
    rt.store.prefetch([early, later], step=5, layer=-1)  # issued before layer 0: due at layers 0 and 1
    rt.drop_stale(1)  # layer 1 is about to run: the layer-0 copy is stale
    assert not policy.resident((0, 1)) and policy.resident((1, 2))
    assert policy.stats.prefetch_dropped == 1 and store.stats.prefetch_dropped == 1
    assert policy.stats.prefetches == 1
    gate.set()
    store.ready([later.slot])
    assert torch.equal(store.slots[later.slot], expert(store, 1, 2))


def test_needed_prefetch_jumps_the_queue(llm: LLM) -> None:
    store = llm.store
    gate = hold_reader(store)
    store.prefetch([Load((1, 3), 1, prefetch=True)], step=0, layer=0)
    store.ready([1])  # the reader is still busy: the copy runs now on the demand path
    assert store.stats.prefetch_promoted == 1
    assert torch.equal(store.slots[1], expert(store, 1, 3))
    gate.set()


def test_newer_load_into_the_same_slot_drops_the_queued_copy(llm: LLM) -> None:
    store = llm.store
    gate = hold_reader(store)
    store.prefetch([Load((1, 0), 2, prefetch=True)], step=0, layer=0)
    store.load([Load((1, 1), 2)])
    gate.set()
    store.close()  # every queued job has run (or was cancelled)
    assert store.stats.prefetch_dropped == 1 and store.stats.demand_loads == 1
    assert torch.equal(store.slots[2], expert(store, 1, 1))


def test_prefetch_for_an_earlier_layer_is_due_next_step(llm: LLM) -> None:
    store, num_layers = llm.store, len(llm.loaded.layers)
    gate = hold_reader(store)
    store.prefetch([Load((0, 4), 3, prefetch=True)], step=2, layer=num_layers - 1)  # wraps to step 3
    assert store.drop_stale(3, 0) == []  # layer 0 of step 3 is the one it is for
    assert [ld.key for ld in store.drop_stale(3, 1)] == [(0, 4)]
    gate.set()
