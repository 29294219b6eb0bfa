"""The static decode path: prefill into a static KV cache, then decode steps in which the device never waits for
the host: on a GPU each step is one replay of a captured CUDA graph (embedding, every layer with its slot-table
experts, final norm, logits); elsewhere the same step runs eagerly.

Between steps the host settles the last step (its routing and what the device served, read back in one sync with
the sampled tokens) and plans the next (``CachePolicy.plan_boundary``), and the slot table executes the plan.
A bucket holds the static state of one batch shape (rows x max_len): KV cache, input buffers, captured graph.
Legend: B rows, L MoE layers, K top-k, V vocabulary.
"""

from __future__ import annotations

import inspect
import time
import warnings

import torch
from transformers import DynamicCache

from moeflow.config import format_size
from moeflow.engine.bucket import Bucket, feed
from moeflow.engine.kv import StaticKV
from moeflow.engine.slot_prefill import PREFILL_BLOCKS
from moeflow.engine.static_rows import StaticRowKV
from moeflow.engine.step_io import HostCopies, read_back, replay_staging, upload_replay
from moeflow.errors import BudgetError
from moeflow.experts.layer import Runtime, StaticBuffers
from moeflow.experts.plan import StepRouting
from moeflow.experts.slot_experts import Projections
from moeflow.experts.slot_table import SlotTable
from moeflow.model.loader import LoadedModel
from moeflow.sequence import Sequence

PLAIN_LAYERS = {"DynamicLayer", "DynamicSlidingWindowLayer"}
"""Cache layers of transformers whose state is keys and values (sliding windows are applied by the masks)."""

COMPILE_BACKEND = "inductor"
"""``torch.compile``'s backend for the step (CPU tests use "aot_eager": the same tracing, no code generation)."""

RECOMPILE_LIMIT = 64
"""Compilations of the step (one per batch shape) before torch.compile would quietly run it uncompiled."""

MIN_LEN = 256
"""Smallest KV length of a bucket (lengths are rounded up to a power of two, so few graphs are captured)."""


class StaticDecoder:
    """Owns the buckets, the slot table and the captured graphs of one engine."""

    def __init__(
        self,
        loaded: LoadedModel,
        runtime: Runtime,
        graphs: bool,
        blocks: dict | None = None,
        kv_budget: int | None = None,
        compiled: bool = False,
        must_compile: bool = False,
    ):
        self.lm, self.rt, self.graphs, self.blocks = loaded, runtime, graphs, blocks
        self.prefill_blocks = dict(PREFILL_BLOCKS)
        """Tiles of a prefill through the slot table (``engine/slot_prefill.py``)."""
        self.compiled = compiled
        self.step = (torch.compile(self._forward, dynamic=False, fullgraph=True, backend=COMPILE_BACKEND)
                     if compiled else self._forward)  # fmt: skip
        """The step itself: ``_forward``, or its compiled form (one graph through the experts' custom ops)."""
        self.must_compile = must_compile
        """Raise if compiling fails (asked for explicitly) instead of warning and running ``_forward``."""
        self.kv_budget = kv_budget
        """Bytes the static KV caches may take (the memory plan's KV reserve when a device budget was given)."""
        params = inspect.signature(loaded.model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        Projections.of(loaded.layers[0].module, loaded.layout)  # refuses layouts the kernel cannot run
        kinds = {type(layer).__name__ for layer in DynamicCache(config=loaded.config).layers}
        if kinds - PLAIN_LAYERS:  # linear attention, mamba, indexers: state the static KV pool does not hold
            raise NotImplementedError(
                f"the static KV cache holds attention keys only, not {sorted(kinds - PLAIN_LAYERS)}"
            )
        self._buckets: dict[tuple[int, int] | tuple[int, int, str], Bucket] = {}
        self._table: SlotTable | None = None
        self._pool = torch.cuda.graph_pool_handle() if graphs else None
        self._side: torch.cuda.Stream | None = None
        self.replay_events: list[tuple[torch.cuda.Event, torch.cuda.Event, float]] | None = None
        """Set a list (benchmarks): each replay appends CUDA events around it and the host seconds before it."""
        """The stream captures warm up and capture on (a new one per capture would leave a cuBLAS workspace per
        stream: +64 MiB per capture on the H200, seen in the peers' peak memory)."""

    @property
    def table(self) -> SlotTable:
        store = self.rt.store
        if self._table is None or self._table.store is not store:  # a new slot pool (reconfigure): start over
            self._table = SlotTable(store, store.num_slots // 2 + 1)  # fill_budget's cap
            if (
                self.compiled
            ):  # one compiled step serves every pool size: the sizes only matter inside the ops
                t = self._table.tensors
                for tensor, dim in ((t.pool, 0), (t.cand, 1), (t.last, 1), (t.taken, 0), (t.scratch, 0)):
                    if tensor.shape[dim] > 1:
                        torch._dynamo.mark_dynamic(tensor, dim)
            self._buckets.clear()  # their graphs go, and with them their memory pool: start a new one
            self._pool = torch.cuda.graph_pool_handle() if self.graphs else None
        return self._table

    def forget_table(self) -> None:
        """Let go of the slot table and the buckets built on it (before a new slot pool is allocated, so that two
        pools are never alive at once; a bucket still held elsewhere, e.g. by continuous batching, keeps its own)."""
        self._table = None
        self._buckets.clear()

    def bucket(self, rows: int, length: int) -> Bucket:
        max_len = max(MIN_LEN, 1 << (length - 1).bit_length())
        key = (rows, max_len)
        table = self.table
        if key not in self._buckets:
            self._buckets[key] = self._new_bucket(rows, max_len, table)
        return self._buckets[key]

    def row_bucket(self, rows: int, length: int) -> Bucket:
        """A bucket whose KV rows are assigned to sequences one at a time (continuous batching): each row has its own
        length, so sequences join and leave between steps under one captured graph (``engine/static_rows.py``)."""
        max_len = max(MIN_LEN, 1 << (length - 1).bit_length())
        key = (rows, max_len, "rows")
        table = self.table
        if key not in self._buckets:
            bucket = self._new_bucket(rows, max_len, table)
            bucket.kv = StaticRowKV(self.lm.model, rows, max_len, self.lm.device, bucket.pos)  # type: ignore[assignment]
            self._buckets[key] = bucket
        return self._buckets[key]

    def drop(self, bucket: Bucket) -> None:
        """Forget ``bucket`` (its KV and graph go with the last reference)."""
        for key, b in list(self._buckets.items()):
            if b is bucket:
                del self._buckets[key]

    def _new_bucket(self, rows: int, max_len: int, table: SlotTable) -> Bucket:
        lm, dev = self.lm, self.lm.device
        shape = (len(lm.layers), rows, lm.top_k)
        rt = self.rt
        bufs = StaticBuffers(
            tensors=table.tensors,
            live=torch.ones(rows, dtype=torch.bool, device=dev),
            route_ids=torch.zeros(shape, dtype=torch.long, device=dev),
            route_w=torch.zeros(shape, dtype=torch.float32, device=dev) if rt.recorder is not None else None,
            replay_ids=torch.zeros(shape, dtype=torch.long, device=dev) if rt.replay is not None else None,
            replay_w=torch.zeros(shape, dtype=torch.float32, device=dev) if rt.replay is not None else None,
            blocks=self.blocks,
        )
        vocab = lm.model.get_output_embeddings().weight.shape[0]
        staging = torch.zeros(3, rows, dtype=torch.long, pin_memory=dev.type == "cuda")
        return Bucket(
            StaticKV(lm.model, rows, max_len, dev),
            bufs,
            torch.zeros(3, rows, dtype=torch.long, device=dev),
            torch.zeros(rows, vocab, dtype=lm.dtype, device=dev),
            staging,
        )

    # ------------------------------------------------------------------------------------ steps
    def prefill(
        self,
        bucket: Bucket,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        slots: StaticBuffers | None = None,
        rows: list[int] | None = None,
        start: int = 0,
    ) -> torch.Tensor:  # [B, V]
        """Run the (left-padded) prompts eagerly into the bucket's cache. The MoE layers take the eager path, or with
        ``slots`` (the step's context holds them) the slot table, for the real ``rows`` of the flattened prompts:
        the policy's boundary plan first, ``step_io.read_back`` after (``engine/slot_prefill.py``). ``start`` > 0:
        ``ids`` are the prompts' columns from ``start`` on (a chunked prefill, ``engine/prefill_chunks.py``; ``mask``
        is always every column's)."""
        if start == 0:
            bucket.kv.reset(mask)
        fresh = not bucket.kv.bytes()
        if slots is not None:
            assert rows is not None
            if self.rt.replay is not None:
                upload_replay(self.rt, slots, rows)
            self.table.apply(self.rt.policy.plan_boundary(len(rows)))
            slots.tensors.begin_step()
        out = self.lm.model(
            input_ids=ids,
            attention_mask=bucket.kv.prefill_masks(ids.shape[1], start),
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: bucket.kv.cache},
        )
        if fresh:
            self._check_kv()
        return out.logits[:, -1, :]

    def kv_bytes(self) -> int:
        """Bytes the static KV caches of the buckets take so far."""
        return sum(b.kv.bytes() for b in self._buckets.values())

    def _check_kv(self) -> None:
        """The static caches allocated so far must fit the KV reserve of the device budget."""
        used = self.kv_bytes()
        if self.kv_budget is not None and used > self.kv_budget:
            rows, length = max((b.kv.rows, b.kv.max_len) for b in self._buckets.values())
            raise BudgetError(
                f"the static KV cache ({len(self._buckets)} batch shape(s), up to {rows} rows x {length} positions) "
                f"takes {format_size(used)}, more than the KV reserve of {format_size(self.kv_budget)}: raise "
                "--device-memory or pass a larger kv_reserve, lower --batch-size, or decode eagerly (--decode eager)"
            )

    def decode(self, bucket: Bucket, seqs: list[Sequence], live: list[int]) -> torch.Tensor:  # [B, V]
        """One decode step for every row (finished rows compute but count for nothing); returns the logits."""
        return self.decode_rows(bucket, [s.output_ids[-1] for s in seqs], [s.position for s in seqs], live)

    def decode_rows(
        self, bucket: Bucket, tokens: list[int], positions: list[int], live: list[int]
    ) -> torch.Tensor:  # [B, V]
        """One decode step, row ``b`` feeding ``tokens[b]`` at ``positions[b]``; only the ``live`` rows count."""
        t0 = time.perf_counter()
        # the staging's last upload has been read: the last step's results were waited for
        feed(bucket.staging, tokens, positions, live)
        bucket.inputs.copy_(bucket.staging, non_blocking=True)  # read inside the step (the graph)
        if self.rt.replay is not None:
            self._upload_replay(bucket, live)
        self.table.apply(self.rt.policy.plan_boundary(len(live)))
        self.run_step(bucket, t0)
        return bucket.logits

    def run_step(self, bucket: Bucket, t0: float | None = None) -> None:
        """The step over what the bucket's inputs hold: run eagerly, or one replay of its graph (captured the first
        time); ``t0``: when the host started preparing it (``replay_events``)."""
        if not self.graphs:
            self._run(bucket)
            return
        if bucket.graph is None:
            bucket.graph = self._capture(bucket)
        if self.replay_events is None:
            bucket.graph.replay()
            return
        host_s = 0.0 if t0 is None else time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        bucket.graph.replay()
        end.record()
        self.replay_events.append((start, end, host_s))

    def undo_step(self, bucket: Bucket) -> None:
        """Take back the KV write position a step advanced (a launched step whose results are dropped: its keys
        are overwritten by the step that replaces it)."""
        torch._foreach_sub_([layer.cumulative_length for layer in bucket.kv.cache.layers], 1)

    def settle(self, bucket: Bucket, live: list[int]) -> StepRouting:
        """After the step (its tokens sampled): what it routed and served, for the policy and the statistics."""
        if bucket.route_host is None:
            bucket.route_host = HostCopies.like(self.table, bucket.bufs)
        return read_back(self.rt, self.table, bucket.bufs, live, bucket.route_host)

    def _upload_replay(self, bucket: Bucket, live: list[int]) -> None:
        if bucket.replay_host is None:  # pinned on a GPU: the upload does not block the host
            bucket.replay_host = replay_staging(bucket.bufs, pin=bucket.inputs.is_cuda)
        upload_replay(self.rt, bucket.bufs, live, bucket.replay_host)

    def _forward(self, bucket: Bucket) -> None:
        """The step itself: device work only (this is what the graph captures)."""
        bucket.bufs.tensors.begin_step()
        bucket.bufs.live.copy_(bucket.inputs[2] != 0)
        out = self.lm.model(
            input_ids=bucket.inputs[0, :, None],
            attention_mask=bucket.kv.decode_masks(),
            position_ids=bucket.inputs[1, :, None],
            use_cache=True,
            logits_to_keep=1,
            **{self.cache_kw: bucket.kv.cache},
        )
        bucket.logits.copy_(out.logits[:, -1, :])

    def _run(self, bucket: Bucket) -> None:
        """One step through ``step``; a compilation that fails (it fails while tracing, before the step has run)
        falls back to ``_forward`` with a warning, unless compiling was asked for explicitly."""
        try:
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                self.step(bucket)
        except Exception as err:
            if self.step == self._forward or self.must_compile:
                raise
            first = (str(err).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile could not compile this model's decode step ({type(err).__name__}: "
                          f"{first}); decoding uncompiled (--no-compile skips the attempt)", stacklevel=2)  # fmt: skip
            self.step = self._forward
            self.step(bucket)

    def _capture(self, bucket: Bucket) -> torch.cuda.CUDAGraph:
        """Warm up (kernels compiled, allocator settled) and capture one step; the cache is left as it was."""
        lengths = [layer.cumulative_length.clone() for layer in bucket.kv.cache.layers]
        if self._side is None:  # one stream for every capture: cuBLAS keeps a workspace per stream it ran on
            self._side = torch.cuda.Stream(bucket.inputs.device)
        side = self._side
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # the first call compiles the step (a compiled step: once per batch shape)
                self._run(bucket)
        torch.cuda.current_stream().wait_stream(side)
        for layer, n in zip(bucket.kv.cache.layers, lengths):
            layer.cumulative_length.copy_(n)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, stream=side):  # not a fresh stream (and workspace)
            self.step(bucket)
        return graph
