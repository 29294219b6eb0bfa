"""Cache policies: pure bookkeeping of which (layer, expert) lives in which device slot.

A policy decides and never touches CUDA or tensors; the store executes its plans. The engine calls, per step:
``begin_step(info)`` → for each MoE layer ``request(layer, experts)`` (returns a :class:`Plan`),
``observe(layer, experts_per_token)`` and ``prefetch(layer)`` (loads for layers ahead) → ``end_step()``.
The simulator drives the very same calls from a recorded trace. Subclasses choose victims (``victim``, or
``select_victim(s)`` over all slots at once) and may override the hooks (``experts.hooks``); residency, hit/miss
accounting and wasted-prefetch accounting live here. The policies themselves are in ``moeflow.experts.policies``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from moeflow.experts import boundary
from moeflow.experts.accounting import PolicyStats
from moeflow.experts.hooks import PolicyHooks
from moeflow.experts.placement import make_loads, take_free
from moeflow.experts.plan import Boundary, Key, Load, Plan, PolicyContext, StepInfo, StepRouting

__all__ = [
    "Boundary",
    "CachePolicy",
    "Key",
    "Load",
    "Plan",
    "PolicyContext",
    "PolicyStats",
    "StepInfo",
    "StepRouting",
]


@dataclass
class CachePolicy(PolicyHooks):
    """Residency bookkeeping over ``num_slots`` slots shared by all MoE layers. Subclass and override
    ``victim`` (and optionally ``on_access``, ``begin_step``, ``observe``, ``prefetch``, ``end_step``)."""

    name: str = field(default="base", init=False)
    num_slots: int = field(default=0, init=False)
    num_layers: int = field(default=0, init=False)
    num_experts: int = field(default=0, init=False)
    top_k: int = field(default=0, init=False)
    slot_of: dict[Key, int] = field(default_factory=dict, init=False)
    key_in: list[Key | None] = field(default_factory=list, init=False)
    stats: PolicyStats = field(default_factory=PolicyStats, init=False)
    clock: int = field(default=0, init=False)
    _unused_prefetch: set[Key] = field(default_factory=set, init=False)

    def bind(self, num_slots: int, num_layers: int, num_experts: int, top_k: int) -> None:
        """Size the policy for a model; forgets all residency."""
        self.num_slots, self.num_layers = num_slots, num_layers
        self.num_experts, self.top_k = num_experts, top_k
        self.slot_of = {}
        self.key_in = [None] * num_slots
        self.slot_layer = np.full(num_slots, -1, np.int64)  # [S] layer of the key in each slot (-1: empty)
        self.slot_expert = np.full(num_slots, -1, np.int64)  # [S] its expert id
        self.slot_used = np.full(num_slots, -1, np.int64)  # [S] order of last use (-1: none since placed)
        self._ticks = 0
        self._free = list(range(num_slots - 1, -1, -1))  # empty slots, lowest index popped first
        self.stats = PolicyStats()
        self._unused_prefetch = set()
        self.clock = 0
        self._offered: list[int] = []  # candidate slots of the coming static step's read-through fills
        # the offered slots of a step planned before the last one settled (``plan_in_flight``)
        self._queued: list[int] | None = None
        self._miss_avg: float | None = None  # misses per static decode step (running average)

    def victim(self, candidates: Sequence[Key], layer: int) -> Key:
        """Which resident key to evict (``layer`` is the layer being served)."""
        raise NotImplementedError

    def select_victim(
        self, protect: set[Key], layer: int, may_evict: Callable[[Key], bool] | None
    ) -> Key | None:
        """The resident key to evict (None: no acceptable one): by default ``victim`` over the resident keys not
        in ``protect`` that ``may_evict`` accepts. Policies override it to pick without building that list."""
        candidates = [k for k in self.slot_of if k not in protect and (may_evict is None or may_evict(k))]
        return self.victim(candidates, layer) if candidates else None

    def select_victims(self, n: int, protect: set[Key], layer: int) -> list[Key]:
        """``n`` keys to evict for a layer's misses, in eviction order: by default ``select_victim`` repeated.
        Policies whose scores do not change within one ``request`` override it to choose all at once."""
        chosen: list[Key] = []
        protect = set(protect)
        for _ in range(n):
            key = self.select_victim(protect, layer, None)
            if key is None:
                break
            chosen.append(key)
            protect.add(key)
        return chosen

    # ------------------------------------------------------------------------------ mechanics
    def touch(self, key: Key) -> None:
        """Mark resident ``key`` as the most recently used (``slot_used`` orders every access)."""
        self._ticks += 1
        self.slot_used[self.slot_of[key]] = self._ticks

    def last_use(self, key: Key) -> int:
        """Order of ``key``'s last use while resident (-1: not resident, or prefetched and not requested since)."""
        slot = self.slot_of.get(key)
        return -1 if slot is None else int(self.slot_used[slot])

    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    def request(self, layer: int, experts: Sequence[int]) -> Plan:
        """Experts ``layer`` needs now (distinct ids, at most ``num_slots``). Misses evict victims (chosen at once,
        before any placement); misses take the free slots first, then the victims in order. Every requested key is
        then touched and passed to ``on_access`` in request order (``on_access_keys``)."""
        if len(experts) > self.num_slots:
            raise ValueError(
                f"layer {layer} asks for {len(experts)} experts but only {self.num_slots} slots exist"
            )
        self.clock += 1
        slot_of = self.slot_of
        keys = [(layer, int(e)) for e in experts]
        found = list(map(slot_of.get, keys))  # each key's slot, None: a miss
        missed = [k for k, s in zip(keys, found) if s is None]
        short = len(missed) - len(self._free)
        victims = self.victims_for(short, keys, found, layer) if short > 0 else []
        if len(victims) < short:
            raise RuntimeError("no evictable slot: more experts needed at once than slots")
        loads: list[Load] = []
        slots = found
        if missed:
            n_free = len(missed) - len(victims)
            taken = take_free(self._free, n_free) + self._evict(victims)
            slot_of.update(zip(missed, taken))
            key_in = self.key_in
            for slot, key in zip(taken, missed):
                key_in[slot] = key
            loads = make_loads(missed, taken, [None] * n_free + victims, False, float("inf"))
            self.slot_layer[taken] = layer
            self.slot_expert[taken] = [k[1] for k in missed]
            if len(missed) == len(keys):
                slots = taken
            else:
                fill = iter(taken)
                slots = [next(fill) if s is None else s for s in found]
        self.slot_used[slots] = np.arange(self._ticks + 1, self._ticks + 1 + len(keys))
        self._ticks += len(keys)
        unused = self._unused_prefetch
        if unused:
            used = unused.intersection(keys)
            self.stats.prefetch_hits += len(used)
            unused -= used
        self.on_access_keys(keys)
        hits = len(keys) - len(loads)
        self.stats.hits += hits
        self.stats.misses += len(loads)
        return Plan(layer, tuple(slots), tuple(loads), hits, len(loads))

    def victims_for(self, n: int, keys: list[Key], found: list[int | None], layer: int) -> list[Key]:
        """``request``'s ``n`` victims for the misses of ``keys`` (``found``: each key's slot, None if not
        resident): ``select_victims`` with every key protected. Policies that rank slots override it to block the
        slots in ``found`` without looking the keys up again."""
        return self.select_victims(n, set(keys), layer)

    def on_access_keys(self, keys: list[Key]) -> None:
        """``on_access`` of each of ``request``'s keys (distinct, one layer) in order; overridden to do it at once."""
        if type(self).on_access is not CachePolicy.on_access:
            for key in keys:
                self.on_access(key)

    def _evict(self, victims: list[Key]) -> list[int]:
        """``_vacate`` of ``victims`` (resident, distinct) at once; their slots (returned) are refilled by the caller."""
        slot_of = self.slot_of
        slots = list(map(slot_of.pop, victims))
        self.stats.evictions += len(victims)
        if self._unused_prefetch and victims:
            wasted = self._unused_prefetch.intersection(victims)
            self.stats.prefetch_wasted += len(wasted)
            self._unused_prefetch -= wasted
        return slots

    def admit(
        self,
        key: Key,
        priority: float = 0.0,
        protect: Iterable[Key] = (),
        may_evict: Callable[[Key], bool] | None = None,
        victim: Key | None = None,
    ) -> Load | None:
        """Bookkeeping for a prefetch of ``key``; None when resident already or no acceptable victim. A caller
        that has chosen the ``victim`` itself (used when no slot is free) skips the policy's selection."""
        if key in self.slot_of:
            return None
        victims = [victim] if victim is not None else None
        load = self._place(key, set(protect), key[0], True, priority, may_evict, victims)
        if load is not None:
            self.stats.prefetches += 1
            self._unused_prefetch.add(key)
            self.on_admit(key)
        return load

    def cancel(self, load: Load) -> None:
        """The store dropped prefetch ``load`` before copying it: its slot holds nothing usable now."""
        if self.slot_of.get(load.key) != load.slot:
            return  # already replaced
        self._free.append(self._vacate(load.key, evicted=False))
        self.stats.prefetches -= 1
        self.stats.prefetch_dropped += 1

    def finish(self) -> None:
        """End of a run: prefetched experts never used count as wasted."""
        self.stats.prefetch_wasted += len(self._unused_prefetch)
        self._unused_prefetch.clear()

    def _place(
        self,
        key: Key,
        protect: set[Key],
        layer: int,
        prefetch: bool,
        priority: float,
        may_evict: Callable[[Key], bool] | None = None,
        victims: list[Key] | None = None,
    ) -> Load | None:
        evicted: Key | None = None
        if self._free:
            slot = self._free.pop()
        else:
            evicted = victims.pop(0) if victims else self.select_victim(protect, layer, may_evict)
            if evicted is None:
                if prefetch:
                    return None
                raise RuntimeError("no evictable slot: more experts needed at once than slots")
            slot = self._vacate(evicted)
        self._occupy(key, slot)
        return Load(key, slot, evicted, prefetch, priority)

    def _occupy(self, key: Key, slot: int) -> None:
        self.slot_of[key] = slot
        self.key_in[slot] = key
        self.slot_layer[slot], self.slot_expert[slot], self.slot_used[slot] = key[0], key[1], -1

    def _vacate(self, key: Key, evicted: bool = True) -> int:
        """Forget resident ``key`` (an eviction, unless ``evicted`` is False: a dropped prefetch); returns its slot."""
        slot = self.slot_of.pop(key)
        self.key_in[slot] = None
        self.slot_layer[slot] = self.slot_expert[slot] = -1
        if evicted:
            self.stats.evictions += 1
            if key in self._unused_prefetch:
                self.stats.prefetch_wasted += 1
        self._unused_prefetch.discard(key)
        return slot

    # ------------------------------------------------------------ static decode: decisions between steps
    def settle_step(self, routing: StepRouting) -> None:
        """A static decode step ran (``routing`` read back from the device): see ``boundary.settle``."""
        hooks = (
            type(self).observe is not CachePolicy.observe or type(self).on_access is not CachePolicy.on_access
        )
        boundary.settle(self, routing, hooks)

    def plan_boundary(self, batch: int) -> Boundary:
        """Between static decode steps, after ``begin_step`` of the coming one: see ``boundary.plan``."""
        return boundary.plan(self, batch)

    def plan_in_flight(self, batch: int) -> Boundary:
        """``plan_boundary`` for a step launched before the step now running is settled (the plan after
        ``begin_step`` of step N, for step N+1): see ``boundary.plan_in_flight``."""
        return boundary.plan_in_flight(self, batch)

    def forget_offered(self) -> None:
        """The step the last plan was for ran but will not be settled (every row had finished before it): what it
        wrote into its candidate slots is unknown, so those slots are emptied."""
        boundary.forget_offered(self)

    def fill_budget(self, batch: int) -> int:
        """Candidate slots to offer for the coming step's misses: twice the recent misses per step plus one
        token's routing per layer (unclaimed candidates cost nothing), at most half the pool."""
        guess = self.num_layers * self.top_k * batch if self._miss_avg is None else 2 * self._miss_avg
        return int(min(guess + self.num_layers * self.top_k, self.num_slots // 2))

    def _fill(self, key: Key, slot: int) -> None:
        """A missed ``key`` was written into ``slot`` by the device (a read-through fill)."""
        held = self.key_in[slot]
        if held is not None:
            self._vacate(held)
        else:
            self._free.remove(slot)
        if key in self.slot_of:  # resident already (a prefetch still landing): the fill is the copy kept
            self._free.append(self._vacate(key, evicted=False))
        self._occupy(key, slot)


POLICIES: dict[str, Callable[[], CachePolicy]] = {}
"""Name → factory, filled by the policy modules (``moeflow.experts.policies``) with :func:`register_policy`;
``moeflow.experts.policies.make_policy`` builds one by name."""


def register_policy(name: str, factory: Callable[[], CachePolicy]) -> None:
    POLICIES[name] = factory
