"""The partial sorts the policies rank victims and candidates with give the full sorts' first entries, ties and
NaNs included."""

from __future__ import annotations

import numpy as np
import pytest

from moeflow.experts.policies.ranking import first_lexsorted, top_stable


@pytest.mark.parametrize("seed", range(6))
def test_first_lexsorted_is_the_full_lexsorts_head(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 3000))
    primary = rng.integers(0, 5, size).astype(np.float64) * 0.25  # many ties on the primary key
    if seed % 2:
        primary[rng.random(size) < 0.1] = np.nan
    if seed == 5:
        primary[:] = np.nan  # the cut itself is NaN
    secondary = rng.integers(0, 40, size)  # ties on both keys: index order decides
    full = np.lexsort((secondary, primary))
    for n in (0, 1, 7, 64, 65, size // 2, size - 1, size, size + 3):
        assert np.array_equal(first_lexsorted(primary, secondary, n), full[: max(n, 0)])


def test_top_stable_is_the_stable_argsorts_head() -> None:
    values = np.random.default_rng(1).integers(0, 6, 500).astype(np.float64)
    full = np.argsort(-values, kind="stable")
    for n in (0, 1, 8, 100, 499, 500, 600):
        assert np.array_equal(top_stable(values, n), full[:n])
