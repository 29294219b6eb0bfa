"""The validation layer: token ids against the vocabulary, prompt length against the context, config and sampling
ranges, cache-size syntax, and ``dtype="auto"`` keeping the checkpoint's dtype on a CPU."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moeflow import LLM, EngineConfig, SamplingParams
from moeflow.cache_size import parse_cache_size
from moeflow.errors import ConfigError, RequestError
from moeflow.model.loader import resolve_dtype
from moeflow.validate import check_context, check_request, prompt_token_ids


def test_token_ids_outside_the_vocabulary() -> None:
    assert prompt_token_ids([0, 5, 299], 300) == [0, 5, 299]
    assert prompt_token_ids(torch.tensor([1, 2]), 300) == [1, 2]
    with pytest.raises(
        RequestError, match=r"token id 300 \(#2 of the prompt\) is outside the vocabulary \[0, 300\)"
    ):
        prompt_token_ids([1, 2, 300], 300)
    with pytest.raises(RequestError, match="token id -1"):
        prompt_token_ids([-1], 300)
    with pytest.raises(RequestError, match="token id #0 of the prompt is 'a', not an integer"):
        prompt_token_ids(["a"], 300)
    with pytest.raises(RequestError, match="a prompt is text or a list of token ids, got int"):
        prompt_token_ids(5, 300)


def test_context_length_is_refused_with_the_numbers() -> None:
    check_context(200, 56, 256)
    with pytest.raises(RequestError, match=r"200 tokens and max_tokens is 64: 264 positions, beyond the model's "
                       r"context of 256; lower max_tokens to 56"):  # fmt: skip
        check_context(200, 64, 256)
    with pytest.raises(RequestError, match="shorten the prompt"):
        check_context(35000, 64, 2048)
    check_context(10**6, 64, None)  # no max_position_embeddings: nothing to check
    config = SimpleNamespace(vocab_size=300, max_position_embeddings=256)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        check_request([400], 4, config)


def test_llm_refuses_bad_token_ids_and_long_prompts(checkpoints: dict[str, Path]) -> None:
    llm = LLM(checkpoints["olmoe"], device="cpu", num_slots=2, progress=False)
    with pytest.raises(RequestError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10_000]], SamplingParams(max_tokens=2))
    with pytest.raises(RequestError, match="beyond the model's context of 256"):
        llm.generate([[1] * 250], SamplingParams(max_tokens=10))


def test_truncate_prompt_keeps_its_last_tokens(checkpoints: dict[str, Path]) -> None:
    llm = LLM(checkpoints["olmoe"], device="cpu", num_slots=2, progress=False)
    long = list(range(1, 251))  # 250 tokens, context 256
    cut = llm.generate([long], SamplingParams(max_tokens=10, ignore_eos=True, truncate_prompt=True))[0]
    last = llm.generate([long[-246:]], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert cut.token_ids == last.token_ids and len(cut.token_ids) == 10
    with pytest.raises(RequestError, match="truncate_prompt=True"):
        llm.generate([long], SamplingParams(max_tokens=10))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(device="tpu"), "unknown device 'tpu'"),
        (dict(dtype="int8"), "unsupported dtype 'int8'"),
        (dict(expert_backend="fast"), "unknown expert backend 'fast'"),
        (dict(num_slots=0), "num_slots must be >= 1, got 0"),
        (dict(num_slots=2.5), "num_slots must be an integer"),
        (dict(max_wait=-1), "max_wait must be >= 0"),
        (dict(device_memory=-5), "must be a finite number of bytes >= 0"),
        (dict(device_memory=float("inf")), "must be a finite number of bytes"),
        (dict(host_memory="lots"), "cannot parse memory size 'lots'"),
        (dict(schedule="random"), "unknown schedule"),
    ],
)
def test_engine_config_refuses(kwargs: dict, message: str) -> None:
    with pytest.raises(Exception, match=message) as info:
        EngineConfig(**kwargs)
    assert info.type.__module__ == "moeflow.errors"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(temperature=float("nan")), "temperature must be a finite number"),
        (dict(temperature=-0.5), "temperature must be >= 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), "top_p must be a finite number"),
        (dict(max_tokens=0), "max_tokens must be >= 1"),
        (dict(max_tokens="4"), "max_tokens must be an integer"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(stop=("",)), "stop strings must be non-empty"),
        (dict(stop=(1,)), "stop must be a string or a list of strings"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_sampling_params_refuse(kwargs: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        SamplingParams(**kwargs)


def test_one_cache_size_syntax() -> None:
    assert parse_cache_size("0.25").slots(1024, 8) == 256
    assert parse_cache_size("25%").slots(1024, 8) == 256
    assert parse_cache_size("256").slots(1024, 8) == 256
    assert parse_cache_size("1.0").slots(16) == 16 and parse_cache_size("1").slots(16) == 1
    for bad in ("2.0", "0", "-1", "150%", "abc", "0.0", "nan", "inf"):
        with pytest.raises(ConfigError):
            parse_cache_size(bad)
    with pytest.raises(ConfigError, match="there are only 16 experts"):
        parse_cache_size("17").slots(16)
    with pytest.raises(ConfigError, match="fewer than one token's 8 routed experts"):
        parse_cache_size("1%").slots(64, 8)


def test_auto_dtype_keeps_the_checkpoint_dtype_on_cpu(tmp_path: Path) -> None:
    cfg = SimpleNamespace(dtype="bfloat16")
    assert resolve_dtype("auto", cfg, torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype("auto", SimpleNamespace(dtype="float32"), torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", SimpleNamespace(dtype="float32"), torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("float32", cfg, torch.device("cpu")) == torch.float32
    # a small checkpoint computes in float32 on a CPU (faster there); a large one keeps its bf16
    assert resolve_dtype("auto", cfg, torch.device("cpu"), weight_bytes=28 * 2**20) == torch.float32
    assert resolve_dtype("auto", cfg, torch.device("cpu"), weight_bytes=8 * 2**30) == torch.bfloat16
    assert resolve_dtype("auto", cfg, torch.device("cuda"), weight_bytes=28 * 2**20) == torch.bfloat16
    with pytest.raises(ConfigError):
        resolve_dtype("int8", cfg, torch.device("cpu"))


def test_bf16_checkpoint_moves_its_own_bytes_on_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    from moeflow.model import loader
    from tests.families import build_checkpoint

    monkeypatch.setattr(loader, "SMALL_ON_CPU", 0)  # as for a checkpoint too large to widen to float32

    path = build_checkpoint("olmoe", tmp_path / "f32")
    bf16 = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(torch.bfloat16).save_pretrained(bf16)
    llm = LLM(bf16, device="cpu", num_slots=2, progress=False)
    assert llm.loaded.dtype == torch.bfloat16 and llm.store.slots.dtype == torch.bfloat16
    out = llm.generate([[5, 17, 42, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.token_ids) == 4
    s = out.stats
    assert (
        s.bytes_to_device == s.misses * llm.info.expert_bytes
    )  # bf16 bytes: what is on disk, not twice that
    assert s.bytes_from_disk == s.bytes_to_device
