"""Expert rows read straight from the checkpoint (model.direct), a CPU store without a host row, and glibc handing
freed large blocks back (moeflow.malloc): the memory fixes of issue 10 (tests/test_rss.py measures the whole)."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.model.loader import open_model
from tests.families import FAMILIES

PROMPT = [[5, 17, 42, 7]]


@pytest.mark.parametrize("family", FAMILIES)
def test_direct_rows_equal_the_converted_rows(checkpoints: dict[str, Path], family: str) -> None:
    lm = open_model(str(checkpoints[family]), torch.device("cpu"), dtype="float32")
    assert {"gate_up_proj", "down_proj"} <= lm.direct  # every family's experts are their parts back to back
    direct = lm.direct
    for layer in range(len(lm.layers)):
        for e in (0, lm.num_experts - 1):
            got, want = torch.empty(lm.layout.numel), torch.empty(lm.layout.numel)
            got_bytes = lm.read_full(layer, e, got)
            lm.direct = frozenset()  # through transformers' conversion operations
            want_bytes = lm.read_full(layer, e, want)
            lm.direct = direct
            assert torch.equal(got, want) and got_bytes == want_bytes


def test_another_compute_dtype_converts(checkpoints: dict[str, Path]) -> None:
    """A float32 checkpoint computed in bf16 is not its disk bytes: it goes through the conversion."""
    lm = open_model(str(checkpoints["olmoe"]), torch.device("cpu"), dtype="bfloat16")
    assert lm.direct == frozenset()
    row = torch.empty(lm.layout.numel, dtype=torch.bfloat16)
    assert lm.read_full(0, 1, row) > 0 and row.abs().sum() > 0


def test_cpu_store_without_host_budget_reads_into_slots(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["olmoe"]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    pooled = LLM(path, device="cpu", num_slots=2, host_memory="1GiB", progress=False)
    llm = LLM(path, device="cpu", num_slots=2, progress=False)
    assert llm.store.host.shape[0] == 0 and pooled.store.host.shape[0] == 16
    out = llm.generate(PROMPT, params)[0]
    assert out.token_ids == pooled.generate(PROMPT, params)[0].token_ids
    assert out.stats.bytes_from_disk == out.stats.misses * llm.info.expert_bytes > 0
    static = LLM(
        path, device="cpu", num_slots=2, decode="static", progress=False
    )  # misses through host_row_of
    assert static.store.host.shape[0] == 0 and static.generate(PROMPT, params)[0].token_ids == out.token_ids


CHILD = r"""
import sys, torch
from moeflow import malloc
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon")) * 1024
if sys.argv[1] == "fixed":
    assert malloc.return_large_blocks()
before = anon()
for _ in range(3):  # the first free raises glibc's dynamic threshold; later blocks of that size stay in the heap
    x = torch.ones(4 << 20, dtype=torch.int32)
    del x
print(anon() - before)
"""


@pytest.mark.skipif(not ctypes.util.find_library("c") or os.uname().sysname != "Linux", reason="glibc only")
def test_fixed_mmap_threshold_returns_freed_blocks() -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}

    def kept(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", CHILD, mode], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    assert kept("dynamic") >= 12 << 20  # 16 MiB kept by the heap after the frees
    assert kept("fixed") < 2 << 20
