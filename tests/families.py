"""Tiny random checkpoints of every supported family, saved in Hugging Face format (shared by the tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerFast

VOCAB = 300
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, max_position_embeddings=256)
MLA = dict(kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, num_key_value_heads=4)

FAMILIES: dict[str, dict] = {
    "mixtral": dict(intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=16, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_hidden_layers=2,
        num_experts=8, num_experts_per_tok=2,
    ),
    "qwen3_moe": dict(
        intermediate_size=16, moe_intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2,
        head_dim=8,
    ),
    "olmoe": dict(intermediate_size=16, num_hidden_layers=2, num_experts=8, num_experts_per_tok=2),
    "deepseek_v2": dict(
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=None, n_group=2,
        topk_group=1, topk_method="group_limited_greedy", **MLA,
    ),
    "deepseek_v3": dict(
        intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=24, n_group=2,
        topk_group=1, **MLA,
    ),
    "gpt_oss": dict(
        intermediate_size=16, num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, head_dim=8,
        layer_types=["sliding_attention", "full_attention"], sliding_window=16,
    ),
}  # fmt: skip

TEXT = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "The capital of France is Paris. The quick brown fox jumps over the lazy dog.",
    "import os\nimport sys\nprint(sys.argv)\n",
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(TEXT * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def build_checkpoint(family: str, out: Path, seed: int = 0, max_shard_size: str | None = None) -> Path:
    """Save a tiny random ``family`` model (float32) with a tokenizer to ``out``."""
    kw = dict(FAMILIES[family])
    kw.setdefault("num_key_value_heads", 2)
    config = AutoConfig.for_model(family, **COMMON, **kw, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with (
        torch.no_grad()
    ):  # a random router is nearly uniform per layer; sharpen it so routing varies by token
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                p.normal_(0, 1.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    build_tokenizer().save_pretrained(out)
    return out


RECIPE: dict = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=4, head_dim=8, max_position_embeddings=256, sliding_window=16,
    num_experts=8, num_local_experts=8, n_routed_experts=8, num_experts_per_tok=2, moe_topk=2,
    shared_expert_intermediate_size=24, n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1,
    kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
    full_attention_interval=2, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
    enable_moe_block=True, top_k_experts=2, unpadded_vocab_size=VOCAB, eos_token_id=0, pad_token_id=0, bos_token_id=0,
)  # fmt: skip
"""One tiny config for every family discovered in transformers (keys a family does not know are ignored)."""

OVERRIDES: dict[str, dict] = {
    "zaya": dict(num_experts_per_tok=1),  # its router supports top-1 only
    "beam": dict(mlp_layer_types=["dense", "sparse", "sparse"]),  # its default: the first 3 layers dense
    "bailing_hybrid": dict(layer_group_size=2),  # one full-attention layer in 3
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention", "linear_attention"]),
    "mimo_v2_flash": dict(num_key_value_heads=2),  # its partial rotary needs grouped heads here
    # mamba heads that divide 2 x hidden, and one attention layer (its cache needs one to report a length)
    "granitemoehybrid": dict(
        mamba_n_heads=4,
        mamba_d_state=16,
        mamba_chunk_size=16,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
    ),
    "lfm2_moe": dict(
        layer_types=["conv", "full_attention", "conv"], num_dense_layers=1
    ),  # no default pattern
    # indexer and n-gram embedding sizes have no defaults that fit a 32-wide model
    **{
        name: dict(
            indexer_n_heads=2,
            indexer_kv_heads=1,
            indexer_head_dim=8,
            indexer_budget=16,
            indexer_compress_ratio=2,
            hc_lowrank=8,
            ngram_vocab_size_base=1000,
            split_ngram_parts=4,
        )
        for name in ("qwen4_exp", "qwen4_exp_text")
    },
}
"""Per-family changes to :data:`RECIPE`, only where a family's config needs them."""


TOWER: dict = dict(
    hidden_size=32, intermediate_size=32, num_hidden_layers=1, depth=1, num_attention_heads=4, num_heads=4,
    num_key_value_heads=4, head_dim=8, out_hidden_size=32,
)  # fmt: skip
"""A tiny vision/audio tower, for multimodal families whose causal-LM class builds one."""


def tiny_config(model_type: str) -> PretrainedConfig:
    """:data:`RECIPE` (the text part of a multimodal config) with the family's :data:`OVERRIDES`."""
    text = {**RECIPE, **OVERRIDES.get(model_type, {})}
    sub_configs = getattr(AutoConfig.for_model(model_type), "sub_configs", {}) or {}
    if "text_config" not in sub_configs:
        return AutoConfig.for_model(model_type, **text)
    towers = {name: dict(TOWER) for name in sub_configs if name != "text_config"}
    ids = {k: text[k] for k in ("eos_token_id", "pad_token_id", "bos_token_id")}
    return AutoConfig.for_model(model_type, text_config=text, **towers, **ids)


def save_random(config: PretrainedConfig, out: Path, seed: int = 0) -> Path:
    """A random float32 model of ``config`` (routers sharpened so routing varies by token) saved to ``out``."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) and p.dim() == 2:
                p.normal_(0, 1.0)
    model.save_pretrained(out)
    return out
