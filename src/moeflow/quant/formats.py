"""The expert storage formats moeflow knows: their names, bit widths and group sizes, and the one-line error for
a name it does not know.

Integer formats are asymmetric (a scale and a zero per group of consecutive input-dimension weights, fitted by
:mod:`moeflow.quant.fit`); ``fp8`` is e4m3 with one float32 scale per group of 128 inputs of each output row (the
layout DeepSeek-V3's block-scaled checkpoints expand to); ``mxfp4`` (OCP microscaling: e2m1 values, one power-of-two
scale per 32) is what gpt-oss checkpoints ship and is read as stored, not produced by moeflow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.errors import ConfigError


@dataclass(frozen=True)
class QuantFormat:
    """How the 2-D weights of an expert are stored."""

    name: str
    kind: str
    """"int" (codes, scale and zero per group), "fp8" (e4m3 codes, scale per group) or "mxfp4"."""
    bits: int
    group: int
    """Weights per group along the input dimension (int: the largest divisor of the input size up to this)."""
    param_dtype: torch.dtype = torch.float16
    """dtype of the stored scale (and zero)."""

    @property
    def levels(self) -> int:
        return 2**self.bits - 1


FORMATS: dict[str, QuantFormat] = {
    "fp8": QuantFormat("fp8", "fp8", 8, 128, torch.float32),
    "int8": QuantFormat("int8", "int", 8, 128, torch.float32),
    "int4": QuantFormat("int4", "int", 4, 128),
    "int3": QuantFormat("int3", "int", 3, 64),
    "int2": QuantFormat("int2", "int", 2, 32),
    "mxfp4": QuantFormat("mxfp4", "mxfp4", 4, 32, torch.uint8),
}
"""Every format a row can hold. Scale bytes per weight: int4 4/128, int3 4/64, int2 4/32, int8 8/128, fp8 4/128."""

EXPERT_DTYPES = ("auto", "bf16", "fp8", "int8", "int4", "int3", "int2")
"""Values of ``--expert-dtype``: "bf16" keeps experts in the compute dtype (full precision), "auto" keeps them as the
checkpoint stores them (full precision, or the format a quantised checkpoint was written in)."""

MISS_DTYPES = ("none", "fp8", "int8", "int4", "int3", "int2")
"""Values of ``--miss-dtype``: the low-precision copy a miss computes with ("none": misses compute at full precision)."""


def check_expert_dtype(
    name: object, what: str = "expert_dtype", choices: tuple[str, ...] = EXPERT_DTYPES
) -> str:
    """``name`` if it is one of ``choices``, else a one-line ConfigError naming them."""
    if name not in choices:
        flag = "--" + what.replace("_", "-")
        raise ConfigError(f"unknown {what} {name!r} ({flag}): use one of {', '.join(choices)}")
    return str(name)


def quant_format(name: str) -> QuantFormat | None:
    """The format for an ``--expert-dtype`` / ``--miss-dtype`` value; None for full precision."""
    return None if name in ("auto", "bf16", "none") else FORMATS[name]


def group_of(fmt: QuantFormat, columns: int) -> int:
    """The group size used for rows of ``columns`` inputs: ``fmt.group`` for fp8/MXFP4 (the last group may be short
    for fp8), for integers the largest divisor of ``columns`` not above ``fmt.group``."""
    if fmt.kind != "int":
        return fmt.group
    return max(d for d in range(1, min(fmt.group, columns) + 1) if columns % d == 0)
