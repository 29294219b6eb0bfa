"""Trace-driven cache simulation: replay recorded routing through the real policies, model the time it costs."""

from moeflow.sim.simulator import SimResult, SimStep, access_sequence, schedule, simulate
from moeflow.sim.timing import TimingModel

__all__ = ["SimResult", "SimStep", "TimingModel", "access_sequence", "schedule", "simulate"]
