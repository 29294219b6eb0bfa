"""The slot-table experts kernel (Triton) equals the torch reference of its inner loop (``ops.project``), reading
experts from slots and from the host pool, with fills, for every launch layout (one program row per expert, or
``COMPACT``: programs for the used experts only): run in Triton's interpreter on the CPU."""

from __future__ import annotations

import textwrap

from tests.experts.interpreted import needs_triton, run_interpreted

SCRIPT = textwrap.dedent(
    """
    import torch
    from moeflow.experts.ops import project
    from moeflow.experts.slot_kernel import slot_linear

    torch.manual_seed(0)
    E, K, N, D, S = 8, 2, 48, 32, 6
    SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 16}
    row = N * D + N + 16  # a weight [N, D], a bias [N], padding
    both = torch.randn(S + E, row)  # one buffer: the kernel addresses the host pool from the slot pool's base
    pool, host = both[:S], both[S:]
    for tiles, compact in ((SMALL, 0), (SMALL, 1), ({}, 1)):  # {}: the default tiles (larger than N and D here)
        for t in (1, 3, 9):
            ids = torch.stack([torch.randperm(E)[:K] for _ in range(t)])
            flat = ids.reshape(-1)
            order = torch.argsort(flat, stable=True).int()
            counts = torch.bincount(flat, minlength=E).int()
            starts = (torch.cumsum(counts, 0) - counts).int()
            slot = torch.full((E,), -1, dtype=torch.int32)
            slot[:3] = torch.tensor([0, 1, 2], dtype=torch.int32)  # experts 0-2 resident
            for s in range(3):
                pool[s].copy_(host[s])
            claim = torch.full((E,), -1, dtype=torch.int32)
            claim[5] = 4  # expert 5, if used, is written into slot 4 as it is read
            pool[4].zero_()
            x = torch.randn(t, D)
            y = torch.zeros(t * K, N)
            slot_linear(x, y, (order, counts, starts), slot, claim, pool, host, 0, (0, D, 1), N * D, K, False,
                        True, {**tiles, "COMPACT": compact})
            for e in flat.unique().tolist():
                pairs = order[starts[e] : starts[e] + counts[e]]
                want = project(host[e], x, pairs, (0, D, 1), N * D, N, K, False)
                torch.testing.assert_close(y[pairs.long()], want, rtol=1e-4, atol=1e-4)
            unused = torch.ones(t * K, dtype=torch.bool)
            unused[order.long()] = False
            assert not unused.any()
            if 5 in flat.tolist():
                assert torch.equal(pool[4, : N * D + N], host[5, : N * D + N])  # weight and bias (not padding)
            else:
                assert not pool[4].any()
    print("ok")
    """
)


@needs_triton
def test_slot_kernel_equals_reference() -> None:
    run_interpreted(SCRIPT)
