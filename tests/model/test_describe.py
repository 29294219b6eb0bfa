"""``moeflow info``'s facts come from the built model: MoE layer ids, top-k, shared experts, expert tensor sources."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from moeflow.model.describe import describe
from moeflow.model.loader import open_model


def test_deepseek_facts(checkpoints: dict[str, Path]) -> None:
    info = describe(open_model(str(checkpoints["deepseek_v3"]), torch.device("cpu"), "float32"))
    assert info["moe_layer_ids"] == [1, 2]  # first_k_dense_replace=1: layer 0 is dense
    assert (info["experts_per_layer"], info["top_k"]) == (8, 2)
    assert info["shared_experts"] == ["shared_experts"]
    src = info["expert_tensors"]
    assert src["gate_up_proj"].startswith("model.layers.1.mlp.experts.{e}.gate_proj.weight + ")
    assert "up_proj.weight" in src["gate_up_proj"] and "Concatenate" in src["gate_up_proj"]
    per = 3 * 16 * 32 * 4  # gate, up, down of [16 x 32], float32
    assert info["bytes_per_expert"] == per and info["expert_bytes_total"] == 16 * per


def test_mixtral_renamed_block_and_fused_gpt_oss(checkpoints: dict[str, Path]) -> None:
    mixtral = describe(open_model(str(checkpoints["mixtral"]), torch.device("cpu"), "float32"))
    assert mixtral["expert_tensors"]["down_proj"].startswith("model.layers.0.block_sparse_moe.experts.{e}.w2")
    assert mixtral["shared_experts"] == []
    gpt_oss = describe(open_model(str(checkpoints["gpt_oss"]), torch.device("cpu"), "float32"))
    assert gpt_oss["expert_tensors"]["gate_up_proj_bias"] == "model.layers.0.mlp.experts.gate_up_proj_bias[e]"


def test_budget_error_names_the_minimum_when_the_dense_part_is_large(checkpoints: dict[str, Path]) -> None:
    """DeepSeek-V3: shared experts and a dense first layer count in the dense part; the error names the total."""
    from moeflow import LLM
    from moeflow.config import format_size
    from moeflow.errors import BudgetError

    lm = open_model(str(checkpoints["deepseek_v3"]), torch.device("cpu"), "float32")
    dense, need = lm.dense_bytes, lm.dense_bytes + lm.top_k * lm.expert_bytes
    assert dense > 16 * lm.expert_bytes  # the dense part outweighs all routed experts
    with pytest.raises(BudgetError, match=f"at least {re.escape(format_size(need))}"):
        LLM(checkpoints["deepseek_v3"], device="cpu", dtype="float32", device_memory=need - 1, progress=False)
    llm = LLM(checkpoints["deepseek_v3"], device="cpu", dtype="float32", device_memory=need, progress=False)
    assert llm.store.num_slots == lm.top_k
