"""Checkpoints whose experts are stored quantised: which format they hold, and reading one expert's row as stored.

Three kinds are recognised from ``config.json``:

- ``moeflow_quantization`` (written by ``moeflow quantize``): each MoE layer's rows are one uint8 tensor
  ``<experts module path>.moeflow_rows`` [E, row bytes], in the :class:`~moeflow.quant.row.RowCodec` layout.
- ``quantization_config.quant_method == "mxfp4"`` (gpt-oss): ``<path>.<param>_blocks`` [E, N, D/32, 16] and
  ``<path>.<param>_scales`` [E, N, D/32], e2m1 nibbles and e8m0 scales, copied into the row unchanged.
- ``quantization_config.quant_method == "fp8"`` with ``weight_block_size`` (DeepSeek-V3 style): every linear
  weight is e4m3 with a float32 ``weight_scale_inv`` per 128 x 128 block. Expert codes are read as stored (through
  the family's own conversion, e.g. gate and up concatenated) and their block scales are expanded to one per output
  row and input block, so a fused weight keeps its scales whatever its row count; dense weights are dequantised at
  load (they stay in the compute dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from moeflow.errors import CheckpointError, UnsupportedModelError
from moeflow.model.checkpoint import Checkpoint
from moeflow.quant.formats import FORMATS, QuantFormat
from moeflow.quant.row import RowCodec

if TYPE_CHECKING:
    from moeflow.model.layout import ExpertLayout
    from moeflow.model.loader import LoadedModel

ROWS_SUFFIX = "moeflow_rows"
CONFIG_KEY = "moeflow_quantization"


@dataclass(frozen=True)
class Stored:
    kind: str
    """"moeflow", "mxfp4" or "fp8"."""
    fmt: QuantFormat
    block: tuple[int, int] = (128, 128)
    """fp8: the (rows, columns) of one scale block."""

    def covered(self, layout: ExpertLayout) -> set[str]:
        """Expert parameters the checkpoint holds in a form the model's conversion does not know."""
        if self.kind == "moeflow":
            return {p.name for p in layout.params}
        if self.kind == "mxfp4":
            return {p.name for p in layout.params if len(p.shape) == 2}
        return set()


def detect(config: dict[str, Any]) -> Stored | None:
    """The quantised form ``config`` (a config.json) declares for the experts, if any."""
    ours = config.get(CONFIG_KEY)
    if ours is not None:
        name = ours.get("expert_dtype") if isinstance(ours, dict) else None
        if name not in FORMATS:
            raise CheckpointError(
                f"config.json {CONFIG_KEY} names format {name!r}, which moeflow does not know"
            )
        return Stored("moeflow", FORMATS[name])
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method == "mxfp4":
        return Stored("mxfp4", FORMATS["mxfp4"])
    if method == "fp8":
        block = qc.get("weight_block_size")
        if not (isinstance(block, list) and len(block) == 2):
            raise CheckpointError(
                "an fp8 checkpoint without weight_block_size [rows, columns] is not supported"
            )
        return Stored(
            "fp8", QuantFormat("fp8", "fp8", 8, int(block[1]), torch.float32), (int(block[0]), int(block[1]))
        )
    if method is not None:
        raise CheckpointError(
            f"quantization method {method!r} is not supported: moeflow reads mxfp4 and block-scaled fp8 checkpoints"
        )
    return None


def dense_reader(stored: Stored | None, ckpt: Checkpoint) -> Callable[[str], torch.Tensor]:
    """How dense tensors are read: fp8 weights with a ``_scale_inv`` beside them come back dequantised (float32)."""
    if stored is None or stored.kind != "fp8":
        return ckpt.tensor

    def read(key: str) -> torch.Tensor:
        value = ckpt.tensor(key)
        scale_key = f"{key}_scale_inv"
        if value.dtype != torch.float8_e4m3fn or scale_key not in ckpt.shard_of:
            return value
        return value.to(torch.float32) * _expand(ckpt.tensor(scale_key), value.shape, stored.block)

    return read


def _expand(scale: torch.Tensor, shape: torch.Size | tuple[int, ...], block: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(N/br), ceil(D/bc)] -> one per element [N, D]."""
    n, d = shape[-2], shape[-1]
    rows = scale.to(torch.float32).repeat_interleave(block[0], dim=-2)[..., :n, :]
    return rows.repeat_interleave(block[1], dim=-1)[..., :d]


def read_stored(lm: LoadedModel, codec: RowCodec, layer: int, e: int, out: torch.Tensor) -> int:
    """Expert ``e`` of MoE layer ``layer`` as the checkpoint stores it, into row ``out`` (uint8); bytes read."""
    stored, ckpt, path = lm.stored, lm.checkpoint, lm.layers[layer].path
    assert stored is not None
    if stored.kind == "moeflow":
        key = f"{path}.{ROWS_SUFFIX}"
        out.copy_(ckpt.slice0(key, e))
        return ckpt.nbytes(key) // lm.num_experts
    nbytes = 0
    for c in codec.params:
        name = f"{path}.{c.param.name}"
        if c.fmt is None:  # biases: through the family's conversion, as full-precision tensors are
            parts = {"raw": lm.weights.expert(name, lm.num_experts, e)}
            nbytes += sum(
                ckpt.nbytes(k) // (lm.num_experts if f else 1)
                for k, f in lm.weights.expert_keys(name, lm.num_experts, e)
            )
        elif stored.kind == "mxfp4":
            blocks, scales = ckpt.slice0(f"{name}_blocks", e), ckpt.slice0(f"{name}_scales", e)
            parts = {"codes": blocks.reshape(blocks.shape[0], -1), "scale": scales}
            nbytes += blocks.numel() + scales.numel()
        else:
            parts = _fp8_parts(lm, stored, name, e, transposed=c.transposed)
            for key, fused in lm.weights.expert_keys(name, lm.num_experts, e):  # codes and their block scales
                both = ckpt.nbytes(key) + ckpt.nbytes(f"{key}_scale_inv")
                nbytes += both // (lm.num_experts if fused else 1)
        codec.write(out, c, parts)
    return nbytes


def _fp8_parts(
    lm: LoadedModel, stored: Stored, name: str, e: int, transposed: bool
) -> dict[str, torch.Tensor]:
    """An fp8 expert weight's codes and row-expanded scales, each built by the family's conversion ops."""
    if transposed:  # row-expanded scales follow output rows; a [in, out] layout would need them per column
        raise UnsupportedModelError(f"{name}: block-scaled fp8 experts stored [in, out] are not supported")
    ckpt = lm.checkpoint

    def codes(key: str, index: int | None) -> torch.Tensor:
        value = ckpt.tensor(key) if index is None else ckpt.slice0(key, index).unsqueeze(0)
        return value.view(torch.uint8)

    def scales(key: str, index: int | None) -> torch.Tensor:
        value = ckpt.tensor(key) if index is None else ckpt.slice0(key, index).unsqueeze(0)
        grid = ckpt.tensor(f"{key}_scale_inv")
        if index is not None:
            grid = grid[index : index + 1]
        return grid.to(torch.float32).repeat_interleave(stored.block[0], dim=-2)[..., : value.shape[-2], :]

    q = lm.weights.expert(name, lm.num_experts, e, read=codes)
    s = lm.weights.expert(name, lm.num_experts, e, read=scales)
    return {"codes": q, "scale": s}
