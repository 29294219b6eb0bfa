"""The engine: ``LLM`` loads a checkpoint with offloaded experts and generates; ``step()`` reads like the design:
hooks before the step -> forward (MoE layers plan, load and compute on slots) -> hooks after -> sample -> settle.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from moeflow.batching import plan_batches
from moeflow.config import EngineConfig
from moeflow.detok import extend_text
from moeflow.engine.decode_mode import choose_static
from moeflow.engine.overlap import Launched, Overlap
from moeflow.engine.prefill_chunks import LONG_PREFILL, chunked_prefill, prefill_columns
from moeflow.engine.setup import ModelInfo, load_tokenizer, make_recorder, resolve_device
from moeflow.engine.slot_prefill import prefill_buffers, real_rows, wants_slots
from moeflow.engine.static import Bucket
from moeflow.engine.step import Steps
from moeflow.engine.step_io import read_back
from moeflow.errors import RequestError
from moeflow.experts.cache import CachePolicy, PolicyContext
from moeflow.experts.layer import Runtime, attach
from moeflow.experts.policies import make_policy
from moeflow.experts.store import ExpertStore
from moeflow.inputs import decode_inputs, prefill_inputs
from moeflow.memory import MemoryPlan, plan_memory
from moeflow.metrics import Counters, batch_stats
from moeflow.model.loader import LoadedModel, load_dense, open_model
from moeflow.routing.trace import Trace, TraceRecorder, TraceReplay
from moeflow.sampling import SamplingParams, sample
from moeflow.sequence import RequestOutput, Sequence, StreamDelta
from moeflow.validate import check_batch_size, request_ids_of


@dataclass
class Batch:
    """The running state of one batch: its cache (eager) or bucket (static), and the eager attention mask."""

    cache: Any = None
    """The eager path's KV cache, as the model built it at the prefill."""
    bucket: Bucket | None = None
    mask: torch.Tensor | None = None
    decoding: bool = False
    """The prefill has run."""
    running: Launched | None = None
    """A decode step launched ahead and not yet settled (``engine/overlap.py``)."""


class LLM:
    """Generate with a Hugging Face MoE checkpoint whose experts are offloaded (see ``EngineConfig`` fields)."""

    def __init__(
        self,
        model: str | Path,
        *,
        record_trace: bool = False,
        replay: Trace | TraceReplay | None = None,
        batch_size: int = 8,
        config: EngineConfig | None = None,
        **options: Any,
    ):
        cfg = config or EngineConfig(**options)
        self.config, self.batch_size, self.model_dir = cfg, check_batch_size(batch_size), str(model)
        self.device = resolve_device(cfg.device)
        self.loaded: LoadedModel = open_model(
            self.model_dir, self.device, cfg.dtype, cfg.expert_dtype, cfg.miss_dtype
        )
        self.memory: MemoryPlan = plan_memory(self.loaded, cfg)  # budget errors before any weight is read
        load_dense(self.loaded, cfg.progress)
        lm = self.loaded
        self.info = ModelInfo.of(lm)
        recorder = make_recorder(self.model_dir, lm) if record_trace else None
        if isinstance(replay, Trace):
            replay = TraceReplay(replay, len(lm.layers), lm.num_experts, lm.top_k)
        self.runtime = self._runtime(recorder, replay)
        self._cache_kw = (
            "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
        )
        self.static = choose_static(cfg, self.device, lm, self.runtime, self.memory)
        self.tokenizer = load_tokenizer(self.model_dir)
        eos = lm.config.eos_token_id if getattr(lm.config, "eos_token_id", None) is not None else []
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self._next_id = 0
        self.steps = Steps(self.runtime)
        self.overlap = (
            Overlap(self.static, self.runtime, self.steps, cfg.overlap_offloaded)
            if cfg.overlap and self.static
            else None
        )

    def _runtime(self, recorder: TraceRecorder | None, replay: TraceReplay | None) -> Runtime:
        """The store, policy and MoE-layer handlers (``moeflow.distributed.engine`` overrides it per rank)."""
        cfg, lm = self.config, self.loaded
        store = ExpertStore(lm, self.memory.num_slots, self.memory.host_capacity, cfg.progress)
        policy = self._policy(cfg.policy, self.memory.num_slots, cfg.extra)
        runtime = Runtime(store, policy, cfg.expert_backend, recorder, replay)
        attach(lm.layers, runtime)
        return runtime

    def _policy(self, spec: Any, num_slots: int, options: dict) -> CachePolicy:
        lm = self.loaded
        policy = make_policy(spec)
        policy.bind(num_slots, len(lm.layers), lm.num_experts, lm.top_k)
        policy.setup(PolicyContext(model_dir=self.model_dir, options=dict(options)))
        return policy

    def reconfigure(
        self, policy: Any = None, num_slots: int | None = None, options: dict | None = None
    ) -> None:
        """Swap the cache policy and/or the slot pool size, keeping dense weights and the host tier (sweeps)."""
        old = self.runtime.store
        slots = num_slots or old.num_slots
        if slots < self.loaded.top_k:
            raise RequestError(f"{slots} slots cannot hold one token's {self.loaded.top_k} routed experts")
        old.close()
        del old.slots, old.views
        if self.static is not None:  # its table holds the old pool: free it before the new one is allocated
            self.static.forget_table()
        self.runtime.store = ExpertStore(self.loaded, slots, 0, False, share_host=self.runtime.store)
        self.runtime.policy = self._policy(policy or self.config.policy, slots, options or self.config.extra)
        attach(self.loaded.layers, self.runtime)

    # ------------------------------------------------------------------------------------------ API
    @property
    def policy(self) -> CachePolicy:
        return self.runtime.policy

    @property
    def store(self) -> ExpertStore:
        return self.runtime.store

    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        params: SamplingParams | None = None,
        request_ids: list[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids), ``batch_size`` sequences at a time. ``request_ids``
        (default: consecutive new ids) name the requests, e.g. to match a replayed trace."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        seqs = self._admit(prompts, params or SamplingParams(), request_ids)
        outputs: dict[int, RequestOutput] = {}
        for batch in self.batches(seqs):
            for _ in self._run([seqs[i] for i in batch]):
                pass
            outputs.update((o.request_id, o) for o in self._last_outputs)
        return [outputs[s.request_id] for s in seqs]

    def batches(self, seqs: list[Sequence]) -> list[list[int]]:
        """Indices of ``seqs`` per batch, in run order (see ``EngineConfig.schedule``)."""
        cfg = self.config
        return plan_batches(seqs, self.batch_size, cfg.schedule, cfg.max_wait, self.policy, self.model_dir)

    def close(self) -> None:
        """End of serving: the policy settles (e.g. saves what it learned) and the store's threads stop (once)."""
        if not getattr(self, "_closed", False):
            self._closed = True
            self.runtime.policy.finish()
            self.runtime.store.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StreamDelta]:
        """Yield text as it is generated for one prompt; the last event carries the full output."""
        (seq,) = self._admit([prompt], params or SamplingParams())
        for done in self._run([seq]):
            if done:
                yield StreamDelta(
                    seq.request_id, seq.stream_delta(), seq.output_ids[-1], True, self._last_outputs[0]
                )
            elif not seq.finished:
                yield StreamDelta(seq.request_id, seq.stream_delta(), seq.output_ids[-1], False)

    def trace(self) -> Trace:
        """Routing recorded so far (``record_trace=True``)."""
        if self.runtime.recorder is None:
            raise RequestError("this LLM was created without record_trace=True")
        return self.runtime.recorder.trace()

    # ------------------------------------------------------------------------------------ internals
    def _admit(
        self, prompts: list, params: SamplingParams, request_ids: list[int] | None = None
    ) -> list[Sequence]:
        if not prompts:
            raise RequestError("no prompts given")
        if request_ids is not None and len(request_ids) != len(prompts):
            raise RequestError(f"{len(request_ids)} request ids for {len(prompts)} prompts")
        seqs = []
        for i, prompt in enumerate(prompts):
            if request_ids is not None:
                self._next_id = request_ids[i]
            ids, text = request_ids_of(prompt, self.tokenizer, self.model_dir, self.loaded.config, params)
            seqs.append(Sequence(self._next_id, text, ids, params))
            if self.runtime.recorder is not None:
                self.runtime.recorder.prompts[self._next_id] = text
            self._next_id += 1
        return seqs

    def _run(self, seqs: list[Sequence]) -> Iterator[bool]:
        """Prefill then decode ``seqs`` together until all finish; yields False after every step, True at the end
        (when ``_last_outputs`` holds the outputs)."""
        params = seqs[0].params
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        before = self._counters()
        batch = Batch()
        if self.static is not None:
            width = max(len(s.prompt_ids) for s in seqs)
            batch.bucket = self.static.bucket(len(seqs), width + max(s.params.max_tokens for s in seqs))
        t0, t_first = time.perf_counter(), 0.0
        try:
            while not all(s.finished for s in seqs):
                self.step(seqs, batch, gen)
                t_first = t_first or time.perf_counter()
                yield False
        finally:  # a consumer that stops early leaves no step unsettled
            if self.overlap is not None and batch.bucket is not None:
                self.overlap.drain(batch.bucket, batch.running)
                batch.running = None
        self._last_outputs = self._outputs(seqs, before, t0, t_first, time.perf_counter())
        yield True

    @torch.inference_mode()
    def step(self, seqs: list[Sequence], batch: Batch, gen: torch.Generator | None) -> None:
        """One forward step of ``seqs`` (the prefill first, then one token each), sampled and settled."""
        t0, stall0 = time.perf_counter(), self.runtime.store.stats.stall_s
        live = [i for i, s in enumerate(seqs) if not s.finished]
        static = self.static is not None and batch.bucket is not None and batch.decoding
        if static and self.overlap is not None and self.overlap.applies(seqs, batch.running):
            batch.running = self.overlap.step(seqs, batch.bucket, batch.running, self._text, self.eos_ids)
            self.runtime.report_timing(time.perf_counter() - t0, stall0)
            return
        if static:
            self.steps.begin_decode(seqs, live, batch.bucket.bufs)
            logits = self.static.decode(batch.bucket, seqs, live)
        else:
            logits = self._eager_forward(seqs, batch)
        params = seqs[0].params
        history = [s.prompt_ids + s.output_ids for s in seqs] if params.repetition_penalty != 1 else None
        tokens = sample(logits, params, gen, history)
        if static:
            self.runtime.policy.settle_step(self.static.settle(batch.bucket, live))
            self.steps.end()
        tokens = tokens.tolist()
        if batch.decoding:
            self.runtime.report_timing(time.perf_counter() - t0, stall0)
        batch.decoding = True
        self.steps.settle(seqs, tokens, self._text, self.eos_ids)

    def _eager_forward(self, seqs: list[Sequence], batch: Batch) -> torch.Tensor:  # [B, V]
        """The prefill (any path) or an eager decode step: the MoE layers plan, load and compute layer by layer."""
        if batch.decoding:
            assert batch.mask is not None
            x = decode_inputs(seqs, batch.mask, self.device)
        else:
            x, width = prefill_inputs(seqs, self.device), max(len(s.prompt_ids) for s in seqs)
            if batch.bucket is not None and prefill_columns(self.static, batch.bucket, width) < width:
                batch.mask = x.mask
                return chunked_prefill(self.static, self.steps, batch.bucket, seqs, x, self.config.progress)
        live = [s for s in seqs if not s.finished]
        tokens = sum(len(t) for t in x.new_tokens)
        bar = tqdm(total=len(self.loaded.layers), desc=f"prefill {tokens} tokens", unit="layer", leave=False, mininterval=0,
                   disable=not (self.config.progress and x.prefill and tokens >= LONG_PREFILL))  # fmt: skip
        # the prefill's MoE layers through the slot table (engine/slot_prefill.py), or layer by layer
        slots, n, on_layer = None, x.ids.numel(), lambda _: bar.update()
        if batch.bucket is not None and wants_slots(self.config.prefill, self.static, n * self.loaded.top_k):
            slots = prefill_buffers(self.static, n, x.keep)
        self.steps.begin(live, x.new_tokens, x.new_positions, x.prefill, x.keep, slots, on_layer)
        if slots is None:  # what the step's first layers will need, from the token ids alone
            self.runtime.prefetch_after(-1)
        if batch.bucket is not None:
            assert self.static is not None
            rows = real_rows(slots, x.keep) if slots is not None else None
            logits = self.static.prefill(batch.bucket, x.ids, x.mask, x.positions, slots, rows)
            if slots is not None:
                self.runtime.policy.settle_step(read_back(self.runtime, self.static.table, slots, rows))
        else:
            # the prefill lets the model build its own cache (hybrid families, MiniMax's own class); decode reuses it
            cache = {self._cache_kw: batch.cache} if batch.cache is not None else {}
            out = self.loaded.model(
                input_ids=x.ids,
                attention_mask=x.mask,
                position_ids=x.positions,
                use_cache=True,
                logits_to_keep=1,
                **cache,
            )
            batch.cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
            logits = out.logits[:, -1, :]
        self.steps.end()
        bar.close()
        batch.mask = x.mask
        return logits

    def _text(self, seq: Sequence, token: int) -> str:
        return extend_text(self.tokenizer, self.eos_ids, seq, token)

    def _counters(self) -> Counters:
        p, s = self.runtime.policy.stats, self.runtime.store.stats
        return (p.hits, p.misses, p.prefetches, s.bytes_to_device, s.bytes_from_disk, s.stall_s)

    def _outputs(
        self, seqs: list[Sequence], before: Counters, t0: float, t_first: float, t_end: float
    ) -> list:
        stats = batch_stats(before, self._counters(), [len(s.output_ids) for s in seqs], t0, t_first, t_end)
        return [
            RequestOutput(s.request_id, s.prompt, s.text, s.output_ids, s.finish_reason, stats) for s in seqs
        ]
