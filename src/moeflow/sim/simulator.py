"""Trace-driven cache simulation: replays a recorded routing trace through the real policy objects with the
calls the engine makes, and counts hits, misses, loads, prefetches and modelled time.

Once: ``on_timing`` with the time model's layer compute and copy time. Per step: ``begin_step(StepInfo)``,
``prefetch(-1)`` (loads before the first layer); per MoE layer ``observe(layer, experts [T, K], weights [T, K])``, then
``request(layer, distinct experts)`` (in chunks of ``num_slots`` when the layer needs more experts than there
are slots, as the engine does), then ``prefetch(layer)``; ``end_step()``; after a request's last step, the
policy's optional ``end_request(request_id)``; at the end ``finish()``.

Scheduling (the trace's own ``step`` field is not used): batch 1 runs requests one after another (a request's
prefill tokens are one step, then one step per decode token); batch ``B`` keeps up to ``B`` requests running,
a newcomer's prefill runs as its own step, and every decode step carries the next decode token of each running
request, in order of arrival (continuous batching).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from moeflow.experts.cache import CachePolicy, Key, PolicyContext, StepInfo
from moeflow.experts.plan import Forecast
from moeflow.experts.policies import make_policy
from moeflow.routing.trace import Trace
from moeflow.sim.timing import TimingModel


@dataclass(frozen=True)
class SimStep:
    """One forward step of the replay."""

    info: StepInfo
    rows: np.ndarray
    """Trace rows [T] of the step's tokens, sequences concatenated in ``info.request_ids`` order."""
    ended: tuple[int, ...]
    """Requests whose last token ran in this step."""


def _request_rows(trace: Trace) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{request: (prefill rows, decode rows)} in trace order."""
    out = {}
    for rid in trace.requests():
        rows = np.flatnonzero(trace.request == rid)
        out[rid] = (rows[~trace.decode[rows]], rows[trace.decode[rows]])
    return out


def _step(
    trace: Trace, index: int, parts: list[tuple[int, np.ndarray]], prefill: bool, ended: tuple
) -> SimStep:
    info = StepInfo(
        step=index,
        request_ids=tuple(r for r, _ in parts),
        token_ids=tuple(tuple(int(t) for t in trace.token[rows]) for _, rows in parts),
        positions=tuple(int(trace.position[rows[0]]) for _, rows in parts),
        prefill=prefill,
    )
    return SimStep(info, np.concatenate([rows for _, rows in parts]), ended)


def schedule(trace: Trace, batch_size: int = 1) -> list[SimStep]:
    """The replay's steps (see the module docstring)."""
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    pending = list(_request_rows(trace).items())
    running: list[list] = []  # [request id, decode rows, next index]
    steps: list[SimStep] = []
    while pending or running:
        while pending and len(running) < batch_size:
            rid, (pre, dec) = pending.pop(0)
            if len(pre):
                steps.append(_step(trace, len(steps), [(rid, pre)], True, () if len(dec) else (rid,)))
            if len(dec):
                running.append([rid, dec, 0])
        if not running:
            continue
        parts = [(rid, dec[i : i + 1]) for rid, dec, i in running]
        for item in running:
            item[2] += 1
        ended = tuple(rid for rid, dec, i in running if i >= len(dec))
        running = [item for item in running if item[2] < len(item[1])]
        steps.append(_step(trace, len(steps), parts, False, ended))
    return steps


def layer_requests(experts: np.ndarray, num_slots: int) -> list[list[int]]:
    """The distinct experts (ascending) of ``experts`` [T, K] (ids < 0 ignored), in chunks of ``num_slots``."""
    ids = [int(e) for e in np.unique(experts[experts >= 0])]
    return [ids[i : i + num_slots] for i in range(0, len(ids), num_slots)]


def access_sequence(trace: Trace, batch_size: int, num_slots: int) -> list[Key]:
    """Every (layer, expert) the replay will request, in order (what the offline optimum looks ahead at)."""
    out: list[Key] = []
    for st in schedule(trace, batch_size):
        ex = trace.experts[st.rows]  # [T, L, K]
        for layer in range(trace.num_layers):
            for chunk in layer_requests(ex[:, layer], num_slots):
                out.extend((layer, e) for e in chunk)
    return out


@dataclass
class SimResult:
    """What one policy did on one trace at one cache size and batch size."""

    policy: str
    cache_slots: int
    cache_fraction: float
    batch_size: int
    steps: int
    decode_tokens: int
    requests: int
    hits: int
    misses: int
    hit_ratio: float
    prefetches: int
    prefetch_hits: int
    prefetch_wasted: int
    evictions: int
    loads: int
    """Demand misses + prefetches: every expert copied to the device."""
    bytes_moved: int | None
    timing: dict | None
    options: dict = field(default_factory=dict)
    decode_loads: int = 0
    """Demand misses + prefetches counted in decode steps only (what a decode benchmark's bytes per token count)."""

    def to_dict(self) -> dict:
        return asdict(self)


def simulate(
    trace: Trace,
    policy: str | CachePolicy | Callable[[], CachePolicy],
    cache_size: int,
    batch_size: int = 1,
    *,
    expert_bytes: int | None = None,
    timing: TimingModel | None = None,
    options: dict | None = None,
    model_dir: str | None = None,
    execution: str = "eager",
    batching: str = "continuous",
    forecast: np.ndarray | None = None,
    forecast_distance: int = 1,
) -> SimResult:
    """Replay ``trace`` through ``policy`` (a registered name, a factory or a fresh instance) with
    ``cache_size`` device slots. ``options`` go to ``PolicyContext.options`` (``batch_size`` is added).
    ``execution``: "eager" (demand loads per layer), "static" (decode steps as the static decode path runs them,
    see ``sim/static.py``; prefill stays eager) or "static-overlap" (as "static" with the offloaded overlap's plans
    one step behind, ``EngineConfig.overlap_offloaded``). ``batching``: "continuous" (the module docstring's) or
    "recorded" (the trace's own steps: the engine's batching when the engine recorded it). ``forecast`` [N, L, E]:
    per trace row, each layer's routing as guessed ``forecast_distance`` layers before it routes (eager execution
    only): the policy gets the step's rows of layer ``l + d`` (``Forecast``) before ``prefetch(l)``, and of the
    first ``d`` layers before ``prefetch(-1)``."""
    from moeflow.sim.static import StaticSteps, recorded_schedule

    if execution not in ("eager", "static", "static-overlap") or batching not in ("continuous", "recorded"):
        raise ValueError(f"unknown execution {execution!r} or batching {batching!r}")
    if forecast is not None and (execution != "eager" or forecast.shape[:2] != trace.experts.shape[:2]):
        raise ValueError("a forecast needs eager execution and one [L, E] row per trace row")
    pol = policy() if callable(policy) and not isinstance(policy, CachePolicy) else make_policy(policy)
    num_layers, num_experts = trace.num_layers, trace.num_experts
    if cache_size < 1:
        raise ValueError("cache size must be at least one slot")
    pol.bind(cache_size, num_layers, num_experts, trace.top_k)
    opts = {"batch_size": batch_size, **(options or {})}
    pol.setup(PolicyContext(model_dir=model_dir, trace=trace, options=opts))
    if timing is None and expert_bytes is not None:
        timing = TimingModel(expert_bytes)
    if timing is not None:
        pol.on_timing(timing.compute_per_layer, timing.expert_bytes / timing.bandwidth)
    end_request = getattr(pol, "end_request", None)
    steps = recorded_schedule(trace) if batching == "recorded" else schedule(trace, batch_size)
    demand = np.zeros(len(steps), np.int64)  # [S]
    prefetch = np.zeros(len(steps), np.int64)  # [S]
    static = StaticSteps(pol, lagged=execution == "static-overlap")
    for s, st in enumerate(steps):
        m0, p0 = pol.stats.misses, pol.stats.prefetches
        if execution != "eager" and not st.info.prefill:
            static.run(st.info, trace.experts[st.rows], steps[s + 1].info if s + 1 < len(steps) else None)
        else:
            ahead = None if forecast is None else (forecast[st.rows], forecast_distance)
            _run_step(pol, st, trace.experts[st.rows], trace.weights[st.rows], ahead)
        if end_request is not None:
            for rid in st.ended:
                end_request(rid)
        demand[s], prefetch[s] = pol.stats.misses - m0, pol.stats.prefetches - p0
    pol.finish()
    prefill = np.array([st.info.prefill for st in steps], bool)
    dec_tokens = np.array([0 if st.info.prefill else len(st.rows) for st in steps], np.int64)
    st_ = pol.stats
    loads = st_.misses + st_.prefetches
    return SimResult(
        policy=pol.name,
        cache_slots=cache_size,
        cache_fraction=cache_size / (num_layers * num_experts),
        batch_size=batch_size,
        steps=len(steps),
        decode_tokens=int(dec_tokens.sum()),
        requests=len(trace.requests()),
        hits=st_.hits,
        misses=st_.misses,
        hit_ratio=st_.hit_ratio,
        prefetches=st_.prefetches,
        prefetch_hits=st_.prefetch_hits,
        prefetch_wasted=st_.prefetch_wasted,
        evictions=st_.evictions,
        loads=loads,
        bytes_moved=loads * timing.expert_bytes if timing else None,
        timing=(
            {**timing.summary(num_layers, demand, prefetch, dec_tokens, prefill), **timing.constants()}
            if timing
            else None
        ),
        options={k: v for k, v in (options or {}).items() if isinstance(v, (str, int, float, bool))},
        decode_loads=int((demand + prefetch)[~prefill].sum()),
    )


def _run_step(pol: CachePolicy, st: SimStep, experts: np.ndarray, weights: np.ndarray,
              ahead: tuple[np.ndarray, int] | None = None) -> None:  # fmt: skip
    """One step: ``experts``/``weights`` [T, L, K] of the step's tokens; ``ahead``: their forecast [T, L, E] and its
    distance d (the layers within d of the start are forecast before the step, one ``prefetch(-1)`` each)."""
    num_layers = experts.shape[1]
    pol.begin_step(st.info)
    if ahead is not None:
        for layer in range(min(ahead[1], num_layers)):
            pol.observe_forecast(Forecast(layer, layer + 1, ahead[0][:, layer]))
            pol.prefetch(-1)
    else:
        pol.prefetch(-1)
    for layer in range(num_layers):
        pol.observe(layer, experts[:, layer], weights[:, layer])
        for chunk in layer_requests(experts[:, layer], pol.num_slots):
            pol.request(layer, chunk)
        if ahead is not None and layer + ahead[1] < num_layers:
            pol.observe_forecast(Forecast(layer + ahead[1], ahead[1], ahead[0][:, layer + ahead[1]]))
        pol.prefetch(layer)
    pol.end_step()
