"""On a CUDA device, the quantisation fit at load runs on the GPU: rows fitted there (in chunks bounded in bytes,
copied back into host rows) dequantise within each format's error bound (the bounds of tests/quant/test_fit.py) and
no worse than the CPU fit; an engine built on the GPU holds such rows for every expert, and its graph decode gives
the eager decode's tokens (the eager layers compute with the rows dequantised: the reference)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.model.layout import ExpertLayout
from moeflow.quant.formats import FORMATS, group_of
from moeflow.quant.row import RowCodec
from tests.quant.test_chunks import LAYOUT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def assert_within_bound(codec: RowCodec, flats: torch.Tensor, rows: torch.Tensor) -> float:
    """Every quantised matrix of ``rows`` dequantises within its format's bound of ``flats``; returns the total
    squared error."""
    total = 0.0
    for c in codec.params:
        p = c.param
        want = flats[:, p.offset : p.offset + p.numel].reshape(-1, *p.shape).float()
        back = codec.dequantise(c, rows)
        if c.fmt is None:
            assert torch.equal(back, want), p.name
            continue
        if c.transposed:
            want, back = want.transpose(1, 2), back.transpose(1, 2)
        d = want.shape[-1]
        if c.fmt.kind == "int":
            g = group_of(c.fmt, d)
            x, err = want.reshape(-1, g), (back - want).reshape(-1, g)
            step = (x.amax(1) - x.amin(1)) / c.fmt.levels
            bound = step / 2 * 1.02 + 2**-10 * x.abs().amax(1)
            ok = err.square().mean(1).sqrt() <= bound
        elif c.fmt.kind == "fp8":
            groups = -(-d // c.fmt.group)
            padded = torch.nn.functional.pad(want.abs(), (0, groups * c.fmt.group - d))
            s = padded.reshape(*want.shape[:-1], groups, -1).amax(-1) / 448
            s = s.repeat_interleave(c.fmt.group, dim=-1)[..., :d]
            ok = (back - want).abs() <= torch.maximum(want.abs() * 2**-4, s * 2**-10) * (1 + 1e-6)
        else:
            blocks = want.reshape(*want.shape[:-1], d // 32, 32)
            amax = blocks.abs().amax(-1, keepdim=True).clamp_min(2**-126)
            unit = torch.exp2(torch.ceil(torch.log2(amax / 6)))
            ok = (back - want).reshape(blocks.shape).abs() <= unit + 1e-30
        assert bool(ok.all()), (codec.fmt.name, p.name)
        total += float((back - want).square().sum())
    return total


@pytest.mark.parametrize("name", ["int4", "int2", "int3", "int8", "fp8", "mxfp4"])
@pytest.mark.parametrize("transposed", [False, True])
def test_cuda_fit_within_bound(name: str, transposed: bool) -> None:
    layout: ExpertLayout = LAYOUT
    codec = RowCodec(layout, FORMATS[name], transposed)
    gen = torch.Generator().manual_seed(5)
    flats = torch.randn(6, layout.numel, generator=gen) * 0.02
    flats[:, :64] *= 50  # outliers
    cpu = codec.encode_many(flats)
    for chunk in (1 << 40, 40 * 64 * 4, 1):  # one fit, 40-row pieces, 8-row pieces
        rows = codec.encode_many(flats, device=torch.device("cuda"), chunk_bytes=chunk)
        assert rows.device.type == "cpu" and rows.shape == cpu.shape
        err = assert_within_bound(codec, flats, rows)
        assert err <= assert_within_bound(codec, flats, cpu) * 1.01 + 1e-12, (name, chunk)


@pytest.mark.parametrize("fmt", ["int4", "fp8"])
def test_engine_fits_on_the_gpu_and_graph_decode_equals_eager(checkpoints: dict[str, Path], fmt: str) -> None:
    path = checkpoints["olmoe"]
    kw = dict(device="cuda", dtype="float32", num_slots=3, expert_dtype=fmt, progress=False)
    eager = LLM(path, decode="eager", **kw)
    lm, host = eager.loaded, eager.store.host
    codec = lm.codecs.host
    assert codec is not None and host.shape[0] == len(lm.layers) * lm.num_experts
    full = torch.empty(host.shape[0], lm.layout.numel)
    for layer in range(len(lm.layers)):
        for e in range(lm.num_experts):
            lm.read_full(layer, e, full[layer * lm.num_experts + e])
    assert_within_bound(codec, full, host.cpu())
    params = SamplingParams(max_tokens=10, ignore_eos=True)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8]]
    want = [o.token_ids for o in eager.generate(prompts, params)]
    graph = LLM(path, decode="graph", **kw)
    assert graph.static is not None and graph.static.graphs
    assert torch.equal(graph.store.host, host)  # the same fit, the same rows
    assert [o.token_ids for o in graph.generate(prompts, params)] == want
