"""benchmarks/peers: checkpoint byte counts from safetensors headers, the result file's merge, the tools' JSON lines."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.peers.llama_runs import jsonl_rows
from benchmarks.peers.record import add_run, load, merge
from benchmarks.peers.sizes import checkpoint_sizes


def test_sizes_split_every_byte_into_dense_and_experts(checkpoints: dict[str, Path]) -> None:
    model = checkpoints["olmoe"]
    cfg = json.loads((model / "config.json").read_text())
    sizes = checkpoint_sizes(model)
    per_expert = 3 * cfg["hidden_size"] * cfg["intermediate_size"] * 4  # float32 gate, up, down
    assert sizes.layers == cfg["num_hidden_layers"] and sizes.num_experts == cfg["num_experts"]
    assert sizes.expert_bytes == per_expert
    assert sizes.expert_bytes_total == sizes.layers * sizes.num_experts * per_expert
    files = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    assert 0 < sizes.dense_bytes < files - sizes.expert_bytes_total  # the rest is the headers
    assert sizes.budget(0.25) == sizes.dense_bytes + sizes.expert_bytes_total // 4


def row(system: str, batch: int, tps: float) -> dict:
    return dict(
        system=system, geometry="olmoe", gpu_budget=1, cache_fraction=0.25, batch=batch, prompt_tokens=512,
        ttft_ms=1.0, ms_per_token=1e3 / tps, tokens_per_s=tps, peak_gpu_bytes=0, notes="n",
    )  # fmt: skip


def test_merge_keeps_each_run_once_and_unites_versions(tmp_path: Path) -> None:
    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "out.json"
    add_run(a, **row("llama.cpp-gpu", 1, 10.0))
    add_run(b, **row("llama.cpp-gpu", 1, 10.0))  # the same run, returned by both calls
    add_run(b, **row("hf-gpu", 8, 20.0))
    for path, name in ((a, "llama.cpp"), (b, "transformers")):
        data = load(path)
        data["versions"][name] = "v"
        path.write_text(json.dumps(data))
    merge([a, b], out)
    merged = load(out)
    assert [(r["system"], r["batch"]) for r in merged["runs"]] == [("llama.cpp-gpu", 1), ("hf-gpu", 8)]
    assert merged["versions"] == {"llama.cpp": "v", "transformers": "v"}


def test_jsonl_rows_skips_log_lines() -> None:
    text = 'main: n_kv_max = 8192\n{"pp": 512, "speed_tg": 9.5}\nnot {json}\n{"pp": 1,\n'
    assert jsonl_rows(text) == [{"pp": 512, "speed_tg": 9.5}]
