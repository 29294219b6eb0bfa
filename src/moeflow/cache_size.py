"""Cache sizes in one syntax for every command and API: a fraction of all experts (``0.25``), a percent (``25%``),
or a count of device slots over all MoE layers together (``64``). A number with a decimal point is a fraction, one
without is a count, so ``1`` is one slot and ``1.0`` is every expert.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from moeflow.errors import ConfigError

_NUMBER = r"[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?"

SYNTAX = "a fraction of all experts like 0.25, a percent like 25%, or a slot count like 64"


@dataclass(frozen=True)
class CacheSize:
    """A parsed cache size: ``count`` slots, or ``fraction`` of all experts (exactly one is set)."""

    text: str
    count: int | None = None
    fraction: float | None = None

    def slots(self, total: int, minimum: int = 1, flag: str = "cache size") -> int:
        """Device slots for a model (or trace) of ``total`` experts; at least ``minimum`` (one token's top-k)."""
        if self.count is not None:
            n = self.count
            if n > total:
                raise ConfigError(
                    f"{flag} {self.text}: there are only {total} experts in all; give at most {total} "
                    "or a share like 25%"
                )
        else:
            n = max(1, round((self.fraction or 0.0) * total))
        if n < minimum:
            raise ConfigError(
                f"{flag} {self.text} gives {n} slot{'s' if n != 1 else ''}, fewer than one token's {minimum} routed "
                f"experts per layer: give at least {minimum} slots"
            )
        return n


def parse_cache_size(text: str | int | float, share_only: bool = False) -> CacheSize:
    """Parse ``text`` (see the module docstring); with ``share_only`` a bare integer is a share too (the older
    ``--cache-fraction`` flag). Raises ConfigError naming the accepted forms."""
    raw = str(text).strip()
    if isinstance(text, bool):
        raise ConfigError(f"cache size {text!r}: write {SYNTAX}")
    if not share_only and (isinstance(text, int) or re.fullmatch(r"[0-9]+", raw)):
        n = int(raw)
        if n < 1:
            raise ConfigError(f"cache size {raw}: at least one slot is needed; write {SYNTAX}")
        return CacheSize(raw, count=n)
    m = re.fullmatch(rf"({_NUMBER})\s*(%?)", raw)
    if not m:
        raise ConfigError(f"cannot read cache size {raw!r}: write {SYNTAX}")
    value = float(m.group(1)) / (100 if m.group(2) else 1)
    if not math.isfinite(value) or not 0 < value <= 1:
        raise ConfigError(f"cache size {raw}: a share must be above 0 and at most 1 (100%); write {SYNTAX}")
    return CacheSize(raw, fraction=value)
