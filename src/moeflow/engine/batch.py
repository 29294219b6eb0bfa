"""Continuous batching: the step-level engine API the server runs on. ``add`` queues a request, ``step`` runs one
token boundary and returns what each sequence produced, ``abort`` ends a request at once.

Each running sequence owns a row of the row KV pool (``engine/rows.py``) from admission until it finishes or is
aborted; then the row is free for the next admitted request, so a finished sequence computes nothing more. One
``step``: (1) admission fills free rows from the waiting requests (``engine/admission.py``: FIFO, or ExpertFlow's
expert-aware choice under a wait bound); (2) one decode forward of every sequence whose prompt is in the KV;
(3) one prefill forward of prompt chunks, at most ``prefill_chunk`` prompt tokens in all, so a long prompt is
spread over several steps while the decoding streams keep getting a token per step. A sequence whose last prompt
chunk ran gets its first token from that forward. Each forward is one of the engine's steps (policy, recorder and
replay see it as ``LLM.step`` does).

Sampling is per sequence (its own settings; a seeded sequence its own generator), so a sequence's output does not
depend on what runs beside it: greedy rows by one argmax, and the sampled rows without a seed by one batched draw on
the device (``sampling.sample_rows``), read back together.

When the engine has a static decode path (``llm.static``), the decode forward is its step (``engine/static_rows.py``):
the rows are those of one static bucket (``max_batch`` rows x a ``max_len`` covering the requests, replaced by a
longer bucket only when an admitted request needs more), each row written at its own position, so one captured
graph replays whichever rows are occupied; rows not decoding compute but count for nothing. Prompt chunks stay
eager and write into their rows of that bucket. Without a static decoder (``decode='eager'``) the rows are the
eager pool of ``rows.py`` (capacity grown by doubling) and every forward runs eagerly.

With the engine's overlapped decode (``EngineConfig.overlap``, ``engine/overlap.py``) a steady serving state (every
running sequence decoding and greedy, nothing waiting, the slot table holding every expert) launches the next decode
step before the last one is settled, so the host's work between steps (read-back, policy, detokenising, outputs)
runs while the device computes. The step launched ahead is settled first in the next ``step`` (before admission
and prompt chunks, so no other forward comes between the two decode steps) or at once by an ``abort``, whose
outputs then open the next ``step``'s. A row that is not decoding is a finished stand-in sequence to the overlap.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

from moeflow.engine.admission import Admission
from moeflow.engine.overlap import Launched
from moeflow.engine.rows import RowKV, row_inputs
from moeflow.engine.static_rows import StaticRows
from moeflow.errors import RequestError
from moeflow.metrics import Counters, PhaseClock, batch_stats
from moeflow.sampling import SamplingParams, pick_tokens
from moeflow.sequence import RequestOutput, Sequence

PLAIN_LAYERS = {"DynamicLayer", "DynamicSlidingWindowLayer"}


@dataclass(frozen=True)
class StepOutput:
    """What one sequence produced in one ``step``: a token, the text now safe to stream, and on the last the output."""

    request_id: int
    token_id: int
    text: str
    finished: bool
    output: RequestOutput | None = None


@dataclass(eq=False)
class Entry:
    """A request in the engine: waiting, or running in ``row`` with ``prefilled`` prompt tokens in the KV."""

    seq: Sequence
    arrival: float
    gen: torch.Generator | None
    path: Any = None
    row: int = -1
    prefilled: int = 0
    waited: int = 0
    first: float = 0.0
    before: Counters | None = None


class BatchEngine:
    """Continuous batching over ``llm`` (a :class:`moeflow.LLM`): at most ``max_batch`` sequences run at once.
    ``static=False`` decodes eagerly even where the engine has a static decode path; ``max_len`` sizes its bucket
    from the start (positions per row; default: as the first requests need, grown when a later one needs more)."""

    def __init__(self, llm: Any, max_batch: int | None = None, prefill_chunk: int = 256,
                 admission: Admission | None = None, static: bool = True, max_len: int = 1):  # fmt: skip
        kinds = {type(layer).__name__ for layer in DynamicCache(config=llm.loaded.config).layers}
        if kinds - PLAIN_LAYERS:
            raise RequestError(
                f"continuous batching holds attention keys only, not {sorted(kinds - PLAIN_LAYERS)} "
                f"({llm.info.model_type}): serve this model one request at a time"
            )
        if prefill_chunk < 1:
            raise RequestError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.llm, self.prefill_chunk = llm, prefill_chunk
        self.max_batch = max_batch or llm.batch_size
        self.admission = admission or Admission.for_llm(llm)
        self.static = llm.static if static else None
        self.kv: RowKV | StaticRows
        if self.static is not None:
            self.kv = StaticRows(self.static, self.max_batch, max_len)
        else:
            context = getattr(llm.loaded.config, "max_position_embeddings", None) or 1 << 16
            self.kv = RowKV(llm.loaded.model, self.max_batch, context + prefill_chunk, llm.device)
        self.waiting: dict[int, Entry] = {}
        self.running: dict[int, Entry] = {}
        self.overlap = llm.overlap if self.static is not None else None
        self.pending: Launched | None = None
        """A decode step launched ahead (overlapped), not yet settled."""
        self._settled: list[StepOutput] = []
        """Outputs of a launched step an ``abort`` settled, reported by the next ``step``."""
        self.clock = PhaseClock()
        """Time spent admitting, decoding and prefilling (the server exports it)."""
        self._vacant = Sequence(-1, "", [], SamplingParams(max_tokens=1), [0], finish_reason="vacant")
        """A row that is not decoding, to the overlap: finished, token 0 at position 0 (as the serial step feeds)."""

    # ------------------------------------------------------------------------------------ API
    def add(self, prompt: str | list[int], params: SamplingParams, request_id: int | None = None,
            arrival: float | None = None) -> int:  # fmt: skip
        """Queue a request (validated now: a bad one raises ``RequestError``); returns its id."""
        ids = None if request_id is None else [request_id]
        (seq,) = self.llm._admit([prompt], params, ids)
        if seq.request_id in self.waiting or seq.request_id in self.running:
            raise RequestError(f"request id {seq.request_id} is already in the engine")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        entry = Entry(seq, arrival if arrival is not None else time.perf_counter(), gen)
        entry.path = self.admission.path(seq)
        self.waiting[seq.request_id] = entry
        return seq.request_id

    def abort(self, request_id: int) -> bool:
        """End a request now (waiting or running): its row and KV are free for the next step. False: unknown."""
        entry = self.waiting.pop(request_id, None)
        if entry is not None:
            return True
        if request_id not in self.running:
            return False
        if self.pending is not None:  # its step is on the device: settle it first (outputs for the next step)
            self._settled += self._overlapped(self._decoding(), ahead=False)
            self._settled = [o for o in self._settled if o.request_id != request_id]  # nothing more for it
        entry = self.running.pop(request_id, None)
        if entry is None:  # it finished in that step
            return True
        self.kv.give_back(entry.row)
        self.llm.runtime.policy.end_request(request_id)
        return True

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """One token boundary: admit, decode every prefilled sequence, prefill the next prompt chunks (a decode step
        launched ahead is settled first, before admission)."""
        outputs, self._settled = self._settled, []
        launched, clock, t0 = self.pending is not None, self.clock, time.perf_counter()
        if launched:
            try:
                outputs += self._decode(self._decoding())
            except BaseException:
                self.pending = None  # not settled again (the caller aborts the running requests)
                raise
            clock.add("decode", t0)
        t0 = time.perf_counter()
        self._admit()
        clock.add("admit", t0)
        decoding, t0 = self._decoding(), time.perf_counter()
        if decoding and not launched:
            outputs += self._decode(decoding) if self.static else self._forward(decoding, [1] * len(decoding))
            clock.add("decode", t0)
        chunks, budget = [], self.prefill_chunk
        for e in self.running.values():
            left = len(e.seq.prompt_ids) - e.prefilled
            if left and budget:
                chunks.append((e, min(left, budget)))
                budget -= chunks[-1][1]
        if chunks:
            t0 = time.perf_counter()
            outputs += self._forward([e for e, _ in chunks], [n for _, n in chunks])
            clock.add("prefill", t0)
            clock.prefill_tokens += self.prefill_chunk - budget
        return outputs

    # ------------------------------------------------------------------------------ internals
    def _decoding(self) -> list[Entry]:
        return [e for e in self.running.values() if e.prefilled == len(e.seq.prompt_ids)]

    def _admit(self) -> None:
        waiting = list(self.waiting.values())
        free = min(self.kv.free, self.max_batch - len(self.running))
        chosen = self.admission.choose([e.path for e in self.running.values()], [e.path for e in waiting],
                                       [e.waited for e in waiting], free)  # fmt: skip
        if isinstance(self.kv, StaticRows) and chosen:  # every running sequence's positions fit the bucket
            self.kv.fit(max(len(e.seq.prompt_ids) + e.seq.params.max_tokens
                            for e in [*self.running.values(), *(waiting[i] for i in chosen)]))  # fmt: skip
        for i in chosen:
            e = waiting[i]
            del self.waiting[e.seq.request_id]
            e.row, e.before = self.kv.take(), self.llm._counters()
            self.running[e.seq.request_id] = e
        for e in self.waiting.values():
            e.waited += 1

    def _forward(self, entries: list[Entry], counts: list[int]) -> list[StepOutput]:
        """One forward of ``entries`` (``counts`` new tokens each: 1 decodes, more is a prompt chunk)."""
        llm, rt = self.llm, self.llm.runtime
        t0, stall0 = time.perf_counter(), rt.store.stats.stall_s
        order = sorted(range(len(entries)), key=lambda i: entries[i].row)
        entries, counts = [entries[i] for i in order], [counts[i] for i in order]
        prefill = any(e.prefilled < len(e.seq.prompt_ids) for e in entries)
        feeds = []
        for e, n in zip(entries, counts):
            s = e.seq
            if e.prefilled < len(s.prompt_ids):
                feeds.append((s.prompt_ids[e.prefilled : e.prefilled + n], e.prefilled))
            else:
                feeds.append(([s.output_ids[-1]], s.position))
        ids, slots, keep = row_inputs(feeds, self.kv.max_len)
        tokens = [new for new, _ in feeds]
        positions = [list(range(start, start + len(new))) for new, start in feeds]
        seqs = [e.seq for e in entries]
        masks = self.kv.select([e.row for e in entries], slots)
        flat = None if bool(keep.all()) else keep.flatten().to(llm.device)
        llm.steps.begin(seqs, tokens, positions, prefill, flat)
        rt.prefetch_after(-1)
        out = llm.loaded.model(input_ids=ids.to(llm.device), attention_mask=masks,
                               position_ids=slots.to(llm.device), use_cache=True, logits_to_keep=1,
                               **{llm._cache_kw: self.kv.cache})  # fmt: skip
        llm.steps.end()
        logits = out.logits[:, -1, :]
        for e, n in zip(entries, counts):
            if e.prefilled < len(e.seq.prompt_ids):
                e.prefilled += n
        ready = [i for i, e in enumerate(entries) if e.prefilled == len(e.seq.prompt_ids)]
        if not prefill:
            rt.report_timing(time.perf_counter() - t0, stall0)
        return self._settle([entries[i] for i in ready], logits, ready) if ready else []

    def _decode(self, entries: list[Entry]) -> list[StepOutput]:
        """One static decode step: every row of the bucket runs, the rows of ``entries`` count."""
        llm, rt, kv, static = self.llm, self.llm.runtime, self.kv, self.static
        assert isinstance(kv, StaticRows) and static is not None
        if self.pending is not None or self._steady(entries):
            return self._overlapped(entries)
        kv.fit(0)  # the same bucket, unless a new slot table (``LLM.reconfigure``) started the buckets afresh
        t0, stall0 = time.perf_counter(), rt.store.stats.stall_s
        entries = sorted(entries, key=lambda e: e.row)
        tokens, positions = (
            [0] * kv.rows,
            [0] * kv.rows,
        )  # a free row: slot 0, which its next prompt writes first
        for e in (
            self.running.values()
        ):  # a row being prefilled: its next prompt slot, which its next chunk writes
            positions[e.row] = e.prefilled
        for e in entries:
            tokens[e.row], positions[e.row] = e.seq.output_ids[-1], e.seq.position
        live, bucket = [e.row for e in entries], kv.bucket
        llm.steps.begin([e.seq for e in entries], [[tokens[r]] for r in live], [[positions[r]] for r in live],
                        False, None, bucket.bufs)  # fmt: skip
        logits = kv.decode(tokens, positions, live)

        def settle() -> None:  # after sampling, as LLM.step: the step's routing and service, then its end
            rt.policy.settle_step(static.settle(bucket, live))
            llm.steps.end()
            rt.report_timing(time.perf_counter() - t0, stall0)

        return self._settle(entries, logits, live, settle)

    def _steady(self, entries: list[Entry]) -> bool:
        """Whether decode steps can be launched ahead: every running sequence decodes greedily, none waits."""
        return (
            self.overlap is not None
            and not self.waiting
            and len(entries) == len(self.running)
            and all(e.seq.params.temperature == 0 and e.seq.params.repetition_penalty == 1 for e in entries)
        )

    def _overlapped(self, entries: list[Entry], ahead: bool = True) -> list[StepOutput]:
        """Settle the launched decode step of ``entries`` (or run one now), launching the next one first where the
        state is steady and the overlap's guess can be made (``engine/overlap.py``)."""
        llm, rt, kv, overlap = self.llm, self.llm.runtime, self.kv, self.overlap
        assert isinstance(kv, StaticRows) and overlap is not None
        if self.pending is None:
            kv.fit(0)
        kv.prepare()
        t0, stall0 = time.perf_counter(), rt.store.stats.stall_s
        entries = sorted(entries, key=lambda e: e.row)
        rows = [self._vacant] * kv.rows
        for e in entries:
            rows[e.row] = e.seq
        ahead = ahead and self._steady(entries)
        self.pending = overlap.step(rows, kv.bucket, self.pending, llm._text, llm.eos_ids, ahead)
        rt.report_timing(time.perf_counter() - t0, stall0)
        return self._report(entries)

    def _settle(self, entries: list[Entry], logits: torch.Tensor, rows: list[int],
                sampled: Callable[[], None] | None = None) -> list[StepOutput]:  # fmt: skip
        """Sample each entry's next token from its row ``rows[i]`` of ``logits`` [R, V] (``sampling.pick_tokens``),
        append it, and report it; ``sampled()`` runs once the tokens are sampled (on the device) and before they are
        read."""
        llm = self.llm
        seqs = [e.seq for e in entries]
        tokens = pick_tokens(logits, rows, [s.params for s in seqs], [e.gen for e in entries],
                             lambda i: seqs[i].prompt_ids + seqs[i].output_ids, sampled)  # fmt: skip
        llm.steps.settle(seqs, tokens, llm._text, llm.eos_ids)
        return self._report(entries)

    def _report(self, entries: list[Entry]) -> list[StepOutput]:
        """Each entry's token of the step just settled, its new text, and (a finished one: its row given back) its
        output."""
        llm, now, outputs = self.llm, time.perf_counter(), []
        for e in entries:
            s = e.seq
            e.first = e.first or now
            done = None
            if s.finished:
                self.running.pop(s.request_id)
                self.kv.give_back(e.row)
                assert e.before is not None
                stats = batch_stats(e.before, llm._counters(), [len(s.output_ids)], e.arrival, e.first, now)
                done = RequestOutput(s.request_id, s.prompt, s.text, s.output_ids, s.finish_reason, stats)
            outputs.append(StepOutput(s.request_id, s.output_ids[-1], s.stream_delta(), s.finished, done))
        return outputs
