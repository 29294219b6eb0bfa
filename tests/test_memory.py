"""Memory planning: slots and reserve from a device budget, and the reserve a GPU runtime needs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from moeflow.config import EngineConfig
from moeflow.errors import BudgetError
from moeflow.memory import CUDA_RUNTIME_BYTES, plan_memory

MiB = 2**20


def model_on(device: str) -> SimpleNamespace:
    """What the planner reads of a loaded model: 2 layers x 8 experts of 1 MiB, 1 MiB dense, top-2."""
    return SimpleNamespace(layers=[0, 1], num_experts=8, expert_bytes=MiB, dense_bytes=MiB, top_k=2,
                           device=torch.device(device), quantises_on_read=False)  # fmt: skip


@pytest.fixture
def gpu(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A model on a (pretended) 80 GB GPU: the planner only asks the GPU's memory size."""
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 2**30, 80 * 2**30))
    return model_on("cuda")


def test_a_gpu_reserve_holds_the_runtime_and_the_rest_is_the_kv_budget(gpu: SimpleNamespace) -> None:
    plan = plan_memory(gpu, EngineConfig(device_memory=MiB + 4 * MiB + 128 * MiB, kv_reserve="128MiB"))
    assert plan.num_slots == 4 and plan.kv_reserve == 128 * MiB
    assert plan.runtime_bytes == CUDA_RUNTIME_BYTES and plan.kv_budget == 128 * MiB - CUDA_RUNTIME_BYTES


def test_a_gpu_reserve_below_the_runtime_is_refused_with_the_fix(gpu: SimpleNamespace) -> None:
    with pytest.raises(BudgetError, match=r"kv_reserve 8.00 MiB cannot hold .* at least 96.00 MiB"):
        plan_memory(gpu, EngineConfig(device_memory="1GiB", kv_reserve="8MiB"))
    default = plan_memory(gpu, EngineConfig(device_memory="1GiB"))  # the default reserve: 256 MiB
    assert default.kv_reserve == 256 * MiB and default.kv_budget == 256 * MiB - CUDA_RUNTIME_BYTES


def test_a_cpu_reserve_is_all_kv() -> None:
    cpu = model_on("cpu")
    plan = plan_memory(cpu, EngineConfig(device_memory=MiB + 4 * MiB + 8 * MiB, kv_reserve="8MiB"))
    assert plan.num_slots == 4 and plan.runtime_bytes == 0 and plan.kv_budget == 8 * MiB
    slots = plan_memory(cpu, EngineConfig(num_slots=3))
    assert slots.num_slots == 3 and slots.kv_budget == 0
