"""The server's Prometheus metrics, in a registry of its own (one per app, no process-global state).

Request-side series (requests by status, tokens, TTFT, time per output token) are recorded by the HTTP handlers;
the engine's expert-cache counters (hits, misses, bytes to the device and from disk, stall time), its time per
step phase (admission, decode, prefill) and the queue and batch gauges are read from the engine when Prometheus
scrapes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class EngineCollector(Collector):
    """Expert-cache counters, read from the engine's policy and store at scrape time."""

    def __init__(self, llm: Any):
        self.llm = llm

    def collect(self) -> Iterator[Any]:
        p, s = self.llm.policy.stats, self.llm.store.stats
        looked_up = p.hits + p.misses
        yield CounterMetricFamily("moeflow_expert_hits", "Expert look-ups found in a device slot", p.hits)
        yield CounterMetricFamily("moeflow_expert_misses", "Expert look-ups that had to load", p.misses)
        yield GaugeMetricFamily(
            "moeflow_expert_hit_ratio",
            "Share of expert look-ups found in a device slot, since start",
            p.hits / looked_up if looked_up else 0.0,
        )
        yield CounterMetricFamily(
            "moeflow_bytes_to_device", "Expert bytes copied host -> device slots", s.bytes_to_device
        )
        yield CounterMetricFamily(
            "moeflow_bytes_from_disk",
            "Expert bytes read from the checkpoint into host RAM",
            s.bytes_from_disk,
        )
        yield CounterMetricFamily(
            "moeflow_stall_seconds", "Time the forward pass waited on expert transfers", s.stall_s
        )
        yield GaugeMetricFamily(
            "moeflow_expert_slots_in_use",
            "Device expert slots holding an expert",
            len(self.llm.policy.slot_of),
        )
        yield GaugeMetricFamily("moeflow_expert_slots", "Device expert slots", self.llm.store.num_slots)


class PhaseCollector(Collector):
    """The serving engine's seconds and count per step phase (``metrics.PhaseClock``; none for a serial engine)."""

    def __init__(self, loop: Any):
        self.loop = loop

    def collect(self) -> Iterator[Any]:
        clock = getattr(self.loop.engine, "clock", None)
        if clock is None:
            return
        seconds = CounterMetricFamily(
            "moeflow_engine_phase_seconds",
            "Engine time per step phase, device read-back included",
            labels=["phase"],
        )
        count = CounterMetricFamily("moeflow_engine_phase", "Engine step phases run", labels=["phase"])
        for phase, value in clock.seconds.items():
            seconds.add_metric([phase], value)
            count.add_metric([phase], clock.count[phase])
        yield seconds
        yield count
        yield CounterMetricFamily(
            "moeflow_engine_prefill_tokens", "Prompt tokens run by prefill forwards", clock.prefill_tokens
        )


class ServerMetrics:
    """Every series the server exports; ``render()`` is the body of ``GET /metrics``."""

    def __init__(self, llm: Any, engine: Any):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "moeflow_requests",
            "HTTP requests answered, by endpoint and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.prompt_tokens = Counter("moeflow_prompt_tokens", "Prompt tokens of served requests", registry=r)
        self.generated_tokens = Counter("moeflow_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram(
            "moeflow_time_to_first_token_seconds",
            "From arrival to the first generated token (queue wait included)",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "moeflow_time_per_output_token_seconds",
            "Mean time per generated token after the first, per request",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        queue = Gauge("moeflow_queue_length", "Requests waiting for the engine", registry=r)
        queue.set_function(lambda: engine.waiting)
        running = Gauge("moeflow_running_batch_size", "Sequences in the batch now running", registry=r)
        running.set_function(lambda: engine.running)
        r.register(EngineCollector(llm))
        r.register(PhaseCollector(engine))

    def finished(self, prompt_tokens: int, output: Any, ttft_s: float | None) -> None:
        """Record one served request: its tokens and latencies (``output`` is the engine's RequestOutput)."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generated_tokens.inc(len(output.token_ids))
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if len(output.token_ids) > 1:
            self.tpot.observe(output.stats.tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
