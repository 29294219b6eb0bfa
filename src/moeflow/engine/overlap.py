"""Overlapped static decode: the host settles step N while the device runs step N+1, so the host work between steps
(the read-back, the policy's settle and plan, sampling bookkeeping, detokenising) no longer leaves the GPU idle.

Step N+1 is launched before step N's results are read, on a guess the host checks afterwards: its input tokens are
step N's greedy tokens, taken on the device (or the replayed trace's recorded ones), every row of step N is still
running, and the slot table the step sees is the one the policy's plan for N+1 would leave. The guess is made only
where the plan cannot matter to the device: greedy sampling, no trace recording, no row reaching ``max_tokens``,
and a slot table holding every expert with no copy in flight (no step can miss, so no step claims a slot; see
``SlotTable.unchanged_by``). After step N is settled the host opens step N+1 for the policy (``begin_step`` and its
plan, in the serial order) and checks the guess: a row that finished (end of sequence, a stop string) or a plan
that changes the table makes the launched step void; it is taken back (its KV write position; its keys are
overwritten) and launched again as the serial path would. Outputs, policy calls and statistics are the serial
path's, step for step, but for the one-time fill of a pool that can hold every expert (prefetches, to the policy).
Each step has its own lane of host buffers (two, alternating), so a launch never overwrites buffers whose copies are
still queued.

Offloaded (``EngineConfig.overlap_offloaded``: the table changes every step, so it cannot be guessed), step N+1 runs
on a plan made before N is settled instead: ``CachePolicy.plan_in_flight`` after ``begin_step`` of N (one step
behind; it leaves N's fill candidates alone), and the step folds N's fills into the table on the device before it
reads it (``SlotTensors.begin_step``). Outputs are the serial path's (a miss is read from host memory whatever the
table says); the policy's decisions are those of a plan one step late, which ``sim/static.py`` models. A launched
step is never taken back: a row that finished at N ran in N+1 too (its token is dropped, its experts counted as
served), and a step whose rows all finished is dropped with its candidate slots emptied (``forget_offered``).
Legend: B rows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from moeflow.engine.bucket import Bucket, feed
from moeflow.engine.static import StaticDecoder
from moeflow.engine.step import Steps
from moeflow.engine.step_io import (
    HostCopies,
    finish_read_back,
    replay_staging,
    start_read_back,
    upload_replay,
)
from moeflow.errors import TraceError
from moeflow.experts.boundary import fill_pool
from moeflow.experts.layer import Runtime
from moeflow.sequence import Sequence


@dataclass
class Lane:
    """Host buffers of every other step: its inputs, its replayed routing, and the copies of its results."""

    staging: torch.Tensor  # [3, B] token, position, liveness (pinned on a GPU)
    device: torch.Tensor  # [B] bool: the row's token is the last step's greedy token on the device
    results: HostCopies
    replay: tuple[torch.Tensor, torch.Tensor] | None
    fed: torch.cuda.Event | None = None
    """Recorded behind the last uploads from this lane (its buffers may be rewritten once it has passed)."""


@dataclass
class Lanes:
    """A bucket's two lanes (step N uses ``pair[N % 2]``) and its device buffer of greedy tokens."""

    pair: tuple[Lane, Lane]
    greedy: torch.Tensor  # [B] each row's greedy token of the last step run (taken on the device after it)


@dataclass(frozen=True)
class Launched:
    """A decode step on the device whose results have not been read: its live rows and its lane."""

    live: tuple[int, ...]
    lane: Lane


@dataclass
class OverlapStats:
    """How often a step was launched ahead, and how often the guess held."""

    launched_ahead: int = 0
    kept: int = 0
    relaunched: int = 0
    """Launched again: a row finished, or the policy's plan changed the table."""
    dropped: int = 0
    """Every row finished: nothing to launch."""


class Overlap:
    """Runs the static decode steps of ``LLM.generate`` overlapped (``EngineConfig.overlap``)."""

    def __init__(self, static: StaticDecoder, runtime: Runtime, steps: Steps, offloaded: bool = True):
        self.static, self.rt, self.steps = static, runtime, steps
        self.offloaded = offloaded
        """Launch ahead with a slot table that changes (``EngineConfig.overlap_offloaded``): see the module doc."""
        self.stats = OverlapStats()
        self._filled: weakref.ref | None = None
        """The slot table whose pool was filled (a reconfigure makes a new one; the old one, and its pool, go)."""

    def applies(self, seqs: list[Sequence], pending: Launched | None) -> bool:
        """Whether this decode step goes through ``step``: a launched step is waiting, or sampling is greedy."""
        params = seqs[0].params
        return pending is not None or (params.temperature == 0 and params.repetition_penalty == 1)

    def step(
        self,
        seqs: list[Sequence],
        bucket: Bucket,
        pending: Launched | None,
        text: Callable[[Sequence, int], str],
        eos_ids: set[int],
        ahead: bool = True,
    ) -> Launched | None:
        """Settle one decode step of ``seqs`` (``pending``, or one launched now), launching the next one first
        where the guess can be made (and ``ahead``: the caller runs no other step before the next decode step);
        returns the step left running (validated), if any."""
        lanes = self._lanes(bucket).pair
        live = [i for i, s in enumerate(seqs) if not s.finished]
        assert pending is None or tuple(live) == pending.live, (
            "the rows of a launched step changed before it settled"
        )
        if pending is None:
            self._fill_pool()
            self.steps.begin_decode(seqs, live, bucket.bufs)
            self.static.table.apply(self.rt.policy.plan_boundary(len(live)))
            pending = self._launch(bucket, lanes[self.steps.index % 2], seqs, live, guess=False)
        lagged = self.offloaded and not self.static.table.holds_every_expert()
        guess = self._guess(bucket, lanes[(self.steps.index + 1) % 2], seqs, live, lagged) if ahead else None
        routing = finish_read_back(self.rt, bucket.bufs, pending.lane.results, live)
        tokens = pending.lane.results.tokens
        assert tokens is not None
        self.rt.policy.settle_step(routing)
        self.steps.end()
        self.steps.settle(seqs, tokens.tolist(), text, eos_ids)
        after = [i for i, s in enumerate(seqs) if not s.finished]
        if guess is None:
            return None
        stats = self.stats
        stats.launched_ahead += 1
        if not after:
            self.static.undo_step(bucket)
            if lagged:  # the launched step's fills are never settled
                self.rt.policy.forget_offered()
            stats.dropped += 1
            return None
        self.steps.begin_decode(seqs, after, bucket.bufs)
        if lagged:  # kept: a row that finished ran in it too (its token is dropped; its experts were served)
            stats.kept += 1
            return Launched(tuple(after), guess.lane)
        plan = self.rt.policy.plan_boundary(len(after))
        if after == live and self.static.table.unchanged_by(plan):
            stats.kept += 1
            return guess
        self.static.undo_step(bucket)
        stats.relaunched += 1
        self.static.table.apply(plan)
        return self._launch(bucket, guess.lane, seqs, after, guess=False)

    def drain(self, bucket: Bucket, pending: Launched | None) -> None:
        """A generation left with a step running (its consumer stopped early): settle that step for the policy; its
        tokens are dropped."""
        if pending is not None:
            self.rt.policy.settle_step(
                finish_read_back(self.rt, bucket.bufs, pending.lane.results, list(pending.live))
            )
            self.steps.end()

    # ------------------------------------------------------------------------------------ internals
    def _fill_pool(self) -> None:
        """A slot pool that can hold every expert gets each one not yet in it (prefetches, once), so that steps
        stop missing and the next ones can be launched ahead."""
        table = self.static.table
        if (self._filled is None or self._filled() is not table) and not table.holds_every_expert():
            fill = fill_pool(self.rt.policy)
            if fill is not None:
                table.apply(fill)
        self._filled = weakref.ref(table)

    def _guess(
        self, bucket: Bucket, lane: Lane, seqs: list[Sequence], live: list[int], lagged: bool
    ) -> Launched | None:
        """Launch step N+1 before step N is read, where its inputs and table can be known (``lagged``: the table of
        a plan made before N is settled): see the module doc."""
        rt = self.rt
        if rt.recorder is not None or not (lagged or self.static.table.holds_every_expert()):
            return None
        if any(len(seqs[i].output_ids) + 1 >= seqs[i].params.max_tokens for i in live):
            return None  # a row ends at this step
        trace_rows = None
        if rt.replay is not None:
            ids = [seqs[i].request_id for i in live]
            try:
                trace_rows = rt.replay.rows(ids, [[seqs[i].position + 1] for i in live])
            except TraceError:
                return None  # the trace ends here: the serial path raises when (if) the step runs
        if lagged:
            self.static.table.apply(rt.policy.plan_in_flight(len(live)), fold=True)
        return self._launch(bucket, lane, seqs, live, guess=True, trace_rows=trace_rows)

    def _launch(
        self,
        bucket: Bucket,
        lane: Lane,
        seqs: list[Sequence],
        live: list[int],
        guess: bool,
        trace_rows: np.ndarray | None = None,
    ) -> Launched:
        """Upload a step's inputs from ``lane`` and run it, then queue the copies of its results and greedy tokens
        into the lane. ``guess``: the step after the one the sequences are at (each row's token is the recorded
        one, else the device's greedy token of the step before)."""
        if lane.fed is not None:
            lane.fed.synchronize()  # the lane's last uploads have been read
        rt, greedy = self.rt, self._lanes(bucket).greedy
        tokens, positions = [s.output_ids[-1] for s in seqs], [s.position for s in seqs]
        on_device = np.zeros(len(seqs), bool)
        if guess:
            for i in live:
                s = seqs[i]
                recorded = rt.replay.token(s.request_id, s.position + 1) if rt.replay is not None else None
                positions[i] += 1
                if recorded is None:
                    on_device[i] = True
                else:
                    tokens[i] = recorded
        feed(lane.staging, tokens, positions, live)
        bucket.inputs.copy_(lane.staging, non_blocking=True)
        if on_device.any():
            lane.device.copy_(torch.from_numpy(on_device))
            flags = lane.device.to(bucket.inputs.device, non_blocking=True)
            bucket.inputs[0].copy_(torch.where(flags, greedy, bucket.inputs[0]))
        if rt.replay is not None:
            upload_replay(rt, bucket.bufs, live, lane.replay, trace_rows if guess else None, waited=True)
        if bucket.inputs.is_cuda:
            lane.fed = torch.cuda.Event()
            lane.fed.record()
        self.static.run_step(bucket)
        torch.argmax(bucket.logits, dim=-1, out=greedy)
        start_read_back(self.static.table, bucket.bufs, lane.results, greedy)
        return Launched(tuple(live), lane)

    def _lanes(self, bucket: Bucket) -> Lanes:
        if bucket.lanes is None:
            bufs, pin = bucket.bufs, bucket.inputs.is_cuda

            def lane() -> Lane:
                staging = torch.zeros(bucket.staging.shape, dtype=torch.long, pin_memory=pin)
                device = torch.zeros(bucket.staging.shape[1], dtype=torch.bool, pin_memory=pin)
                results = HostCopies.like(self.static.table, bufs, tokens=True)
                rep = replay_staging(bufs, pin) if bufs.replay_ids is not None else None
                return Lane(staging, device, results, rep)

            greedy = torch.zeros(bucket.logits.shape[0], dtype=torch.long, device=bucket.logits.device)
            bucket.lanes = Lanes((lane(), lane()), greedy)
        return bucket.lanes
