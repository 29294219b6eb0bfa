"""Byte-aware prefetch: a prefetch is worth issuing only if what it is expected to save beats what it costs.

Within one forward step the host→device link is modelled as one queue: layer ``l``'s router runs ``l · c`` seconds
into the step (``c``: one layer's compute), one expert copy takes ``t`` seconds, and copies run one after
another. A prefetch for layer ``j``, issued when layer ``l`` has routed (``prefetch(l)``; ``l = -1``: before the
step, counted as at 0), starts when the link is free, and is needed when layer ``j`` routes (``j · c``): a copy
for the next layer has one layer's compute to hide in. Then:

* benefit = p_use · t: with probability ``p_use`` the expert is requested and a demand miss (a stall of one copy)
  is avoided;
* displacement = p_victim · t: the evicted expert may be requested in turn (0 for a free slot);
* link cost = how late the copy lands past its deadline (capped at ``t``): a copy the compute hides is free,
  one that the compute cannot hide stalls the step as a miss would — given the copies already queued.

It is issued only if benefit > displacement + link cost. Without timing (``on_timing`` never called) every
prefetch passes (the policies' own rules alone decide). Pure Python.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class LinkLedger:
    layer_s: float = 0.0
    """Compute per layer (seconds)."""
    copy_s: float = 0.0
    """One expert copy (seconds); 0: no timing known, everything passes."""
    busy_until: float = 0.0
    """When the copies queued in this step finish (seconds from the step's start)."""
    issued: int = 0
    refused: int = 0

    def begin_step(self) -> None:
        self.busy_until = 0.0

    def link_cost(self, after_layer: int, target_layer: int) -> float:
        """Seconds of stall a copy for ``target_layer`` issued after ``after_layer`` would cause."""
        start = max(self.busy_until, max(after_layer, 0) * self.layer_s)
        late = start + self.copy_s - target_layer * self.layer_s
        return min(self.copy_s, max(0.0, late))

    def worth(self, p_use: float, p_victim: float, after_layer: int, target_layer: int) -> bool:
        """Whether the prefetch pays (module docstring); counts refusals."""
        if self.copy_s <= 0:
            return True
        ok = (p_use - p_victim) * self.copy_s > self.link_cost(after_layer, target_layer)
        self.refused += not ok
        return ok

    def queue(self, after_layer: int, copies: int = 1) -> None:
        """``copies`` copies issued after ``after_layer`` join the queue, one after another."""
        start, busy = max(after_layer, 0) * self.layer_s, self.busy_until
        for _ in range(copies):
            busy = max(busy, start) + self.copy_s
        self.busy_until = busy
        self.issued += copies
