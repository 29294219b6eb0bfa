"""benchmarks/peers: checkpoint byte counts from safetensors headers, the result file's merge and replace, the
tools' JSON lines, and the KV bytes moeflow's runs plan their budgets with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.peers.llama_runs import jsonl_rows
from benchmarks.peers.moeflow_runs import kv_bytes, warmup_requests
from benchmarks.peers.record import add_run, add_skip, load, merge, replace
from benchmarks.peers.sizes import checkpoint_sizes
from moeflow import LLM, SamplingParams
from moeflow.errors import BudgetError


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
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    assert sizes.kv_values_per_token == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim


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


def result_file(path: Path, commit: str, rows: list[dict], skips: list[str] = ()) -> Path:
    for r in rows:
        add_run(path, **r)
    for system in skips:
        add_skip(path, system, "past the deadline")
    data = load(path)
    data["commit"] = commit
    path.write_text(json.dumps(data))
    return path


def test_replace_takes_the_named_systems_from_the_new_run(tmp_path: Path) -> None:
    old = result_file(tmp_path / "old.json", "aaa", [row("llama.cpp-gpu", 1, 10.0), row("moeflow-lru", 1, 5.0),
                      row("moeflow-lfu", 1, 6.0), row("hf-gpu", 1, 2.0)], ["moeflow-lfu", "hf-accelerate"])  # fmt: skip
    new = result_file(tmp_path / "new.json", "bbb", [row("moeflow-lru", 1, 7.0), row("moeflow-lru", 8, 9.0),
                      row("hf-gpu", 1, 99.0)], ["moeflow-expertflow"])  # fmt: skip
    out = tmp_path / "out.json"
    replace(old, new, ["moeflow-"], out, note="budgeted")
    got = load(out)
    assert [(r["system"], r["batch"], r["tokens_per_s"], r.get("commit")) for r in got["runs"]] == [
        ("llama.cpp-gpu", 1, 10.0, None),
        (
            "moeflow-lru",
            1,
            7.0,
            "bbb",
        ),  # where the old moeflow rows stood; the new run's hf-gpu row is not taken
        ("moeflow-lru", 8, 9.0, "bbb"),
        ("hf-gpu", 1, 2.0, None),
    ]
    assert [s["system"] for s in got["skipped"]] == ["hf-accelerate", "moeflow-expertflow"]
    assert got["commit"] == "aaa"
    base, entry = got["provenance"]
    assert base["commit"] == "aaa" and base["source"] == "old.json"
    assert entry["commit"] == "bbb" and entry["systems"] == ["moeflow-"] and entry["runs"] == 2
    assert entry["source"] == "new.json" and entry["note"] == "budgeted"

    again = result_file(tmp_path / "again.json", "ccc", [row("moeflow-lru", 1, 8.0), row("hf-gpu", 8, 3.0)])
    replace(out, again, ["moeflow-lru", "hf-"], out)  # the first replacement's rows are not all covered: kept
    got = load(out)
    assert [(r["system"], r.get("commit")) for r in got["runs"]] == [
        ("llama.cpp-gpu", None), ("moeflow-lru", "ccc"), ("hf-gpu", "ccc"),
    ]  # fmt: skip
    assert [p["commit"] for p in got["provenance"]] == ["aaa", "bbb", "ccc"]
    replace(out, again, ["moeflow-"], out)  # covers the "bbb" replacement wholly: its entry goes
    assert [p["commit"] for p in load(out)["provenance"]] == ["aaa", "ccc", "ccc"]


def test_replace_from_the_same_commit_adds_no_row_commit(tmp_path: Path) -> None:
    old = result_file(tmp_path / "old.json", "aaa", [row("moeflow-lru", 1, 5.0)])
    new = result_file(tmp_path / "new.json", "aaa", [row("moeflow-lru", 1, 6.0)])
    replace(old, new, ["moeflow-"], tmp_path / "out.json")
    (only,) = load(tmp_path / "out.json")["runs"]
    assert only["tokens_per_s"] == 6.0 and "commit" not in only


def test_kv_bytes_count_one_bucket_per_distinct_shape(checkpoints: dict[str, Path]) -> None:
    sizes = checkpoint_sizes(checkpoints["olmoe"])
    per = sizes.kv_values_per_token * 2  # bf16
    reqs = [(0, [1] * 200, 24), (1, [1] * 480, 24), (2, [1] * 100, 24), (3, [1] * 300, 24)]
    # batch 1: 224 and 124 positions round to 256 (one bucket), 504 and 324 to 512 (another)
    assert kv_bytes(reqs, 1, sizes) == (256 + 512) * per
    assert kv_bytes(reqs, 2, sizes) == 2 * 512 * per  # (200, 480) and (100, 300): both 2 rows x 512
    assert kv_bytes(reqs, 4, sizes) == 4 * 512 * per
    assert [r for r, _, _ in warmup_requests(reqs, 1)] == [0, 1]  # one request per bucket shape
    assert [r for r, _, _ in warmup_requests(reqs, 2)] == [0, 1]


@pytest.mark.parametrize("batch", [1, 2])
def test_kv_bytes_is_what_the_static_decode_allocates(checkpoints: dict[str, Path], batch: int) -> None:
    """The engine's KV check (a static cache beyond the KV reserve raises) passes at exactly ``kv_bytes`` and
    fails one byte below it."""
    model = checkpoints["olmoe"]
    reqs = [(0, [5] * 30, 4), (1, [6] * 12, 4)]
    need = kv_bytes(reqs, batch, checkpoint_sizes(model))
    for reserve, fits in ((need, True), (need - 1, False)):
        llm = LLM(model, device="cpu", dtype="bfloat16", decode="static", num_slots=8, kv_reserve=reserve,
                  batch_size=batch, progress=False)  # fmt: skip
        params = SamplingParams(max_tokens=4, ignore_eos=True)
        if fits:
            assert all(len(o.token_ids) == 4 for o in llm.generate([p for _, p, _ in reqs], params))
        else:
            with pytest.raises(BudgetError, match="KV reserve"):
                llm.generate([p for _, p, _ in reqs], params)
