"""Expert rows in the form the engine holds them: full precision (the compute dtype) or a quantised
:class:`~moeflow.quant.row.RowCodec` row, read from a checkpoint that stores experts either way.

``--expert-dtype`` picks the host and slot form (``auto``: as stored), ``--miss-dtype`` a second, low-precision form
kept for every expert beside full-precision slots. A row is read as stored when the forms agree, quantised once when
the checkpoint is full precision, and dequantised (then re-quantised, if asked) when they differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from moeflow.errors import CheckpointError, ConfigError
from moeflow.model.stored import Stored, read_stored
from moeflow.quant.formats import FORMATS
from moeflow.quant.row import FIT_CHUNK_BYTES, RowCodec

if TYPE_CHECKING:
    from moeflow.model.layout import ExpertLayout
    from moeflow.model.loader import LoadedModel


@dataclass(frozen=True)
class Codecs:
    stored: RowCodec | None
    """The checkpoint's own quantised form (None: full precision on disk)."""
    host: RowCodec | None
    """Form of the host pool and the slots (None: the compute dtype)."""
    low: RowCodec | None
    """Low-precision copy a miss computes with (``--miss-dtype``), or None."""


def choose_codecs(
    stored: Stored | None, layout: ExpertLayout, transposed: bool, expert_dtype: str, miss_dtype: str
) -> Codecs:
    """The codecs for ``--expert-dtype`` / ``--miss-dtype`` on a checkpoint storing experts as ``stored``."""
    own = RowCodec(layout, stored.fmt, transposed) if stored is not None else None

    def codec(name: str) -> RowCodec:
        return (
            own if own is not None and own.fmt.name == name else RowCodec(layout, FORMATS[name], transposed)
        )

    host = own if expert_dtype == "auto" else None if expert_dtype == "bf16" else codec(expert_dtype)
    low = None
    if miss_dtype != "none":
        if host is not None:
            raise ConfigError(
                f"--miss-dtype {miss_dtype} computes misses in low precision beside full-precision slots, but the "
                f"experts are held as {host.fmt.name}: pass --expert-dtype bf16"
            )
        low = codec(miss_dtype)
    return Codecs(own, host, low)


def check_stored_rows(lm: LoadedModel) -> None:
    """A ``moeflow quantize`` checkpoint's row tensors have the row size this model's layout gives."""
    if lm.stored is None or lm.stored.kind != "moeflow" or lm.codecs.stored is None:
        return
    want = [lm.num_experts, lm.codecs.stored.nbytes]
    for layer in lm.layers:
        key = f"{layer.path}.moeflow_rows"
        if key not in lm.checkpoint.shard_of:
            raise CheckpointError(
                f"the quantised checkpoint lacks {key}: write it again with moeflow quantize"
            )
        if lm.checkpoint.shape(key) != want:
            raise CheckpointError(
                f"{key} has shape {lm.checkpoint.shape(key)}, this model's {lm.stored.fmt.name} rows need {want}: "
                "the checkpoint was written by another moeflow version; quantize it again"
            )


def read_row(lm: LoadedModel, layer: int, e: int, out: torch.Tensor, codec: RowCodec | None) -> int:
    """Expert ``e`` of MoE layer ``layer`` into ``out`` in form ``codec`` (None: flat compute-dtype row); returns
    the bytes read from the checkpoint."""
    own = lm.codecs.stored
    if own is not None and codec is own:
        return read_stored(lm, own, layer, e, out)
    if own is None:
        if codec is None:
            return lm.read_full(layer, e, out)
        full = torch.empty(lm.layout.numel, dtype=torch.float32)
        nbytes = lm.read_full(layer, e, full)
        codec.encode(full, out)
        return nbytes
    raw = torch.zeros(own.nbytes, dtype=torch.uint8)
    nbytes = read_stored(lm, own, layer, e, raw)
    full = own.decode(raw[None], torch.float32)[0]
    if codec is None:
        out.copy_(full)
    else:
        codec.encode(full, out)
    return nbytes


def read_rows(
    lm: LoadedModel, layer: int, experts: list[int], out: torch.Tensor, codec: RowCodec | None
) -> int:
    """:func:`read_row` for several experts of one layer into ``out`` [n, row]; a quantisation fit runs over as many
    of them at once as ``FIT_CHUNK_BYTES`` of float32 weights allow (much faster than one by one), on the model's
    device when that is a GPU (the rows copied back into ``out``). Returns the bytes read."""
    own = lm.codecs.stored
    if codec is None or codec is own:
        return sum(read_row(lm, layer, e, out[i], codec) for i, e in enumerate(experts))
    device = lm.device if lm.device.type == "cuda" else None
    step, nbytes = max(1, FIT_CHUNK_BYTES // (lm.layout.numel * 4)), 0
    for first in range(0, len(experts), step):
        chunk = experts[first : first + step]
        full = torch.empty(len(chunk), lm.layout.numel, dtype=torch.float32)
        if own is None:
            nbytes += sum(lm.read_full(layer, e, full[i]) for i, e in enumerate(chunk))
        else:
            raw = torch.zeros(len(chunk), own.nbytes, dtype=torch.uint8)
            nbytes += sum(read_stored(lm, own, layer, e, raw[i]) for i, e in enumerate(chunk))
            full = own.decode(raw, torch.float32)
        codec.encode_many(full, out[first : first + len(chunk)], device=device)
    return nbytes
