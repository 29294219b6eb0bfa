"""The fused route kernel (Triton) equals the NumPy rule it implements (``claims.route_layer``), on random routing, candidates and live rows:
run in Triton's interpreter on the CPU (skipped where Triton is not installed)."""

from __future__ import annotations

import textwrap

from tests.experts.interpreted import needs_triton, run_interpreted

SCRIPT = textwrap.dedent(
    """
    import torch
    from moeflow.experts.route_kernel import route
    from moeflow.experts.slot_experts import SlotTensors, group_pairs

    torch.manual_seed(0)
    L, E, K, S = 4, 16, 4, 24
    for trial in range(12):
        T, C = int(torch.randint(1, 6, ())), int(torch.randint(1, 12, ()))
        table = torch.full((L, E), -1, dtype=torch.int32)
        table.view(-1)[torch.randperm(L * E)[:S]] = torch.randperm(S).int()
        cand = torch.full((3, C), -1, dtype=torch.int32)
        for i, s in enumerate(torch.randperm(S)[: int(torch.randint(0, C + 1, ()))].tolist()):
            where = (table.view(-1) == s).nonzero()
            key = int(where[0]) if len(where) else -1
            cand[:, i] = torch.tensor([s, key // E if key >= 0 else -1, key % E if key >= 0 else -1])
        def state():
            return SlotTensors(pool=torch.empty(S, 4), host=None, host_row=None, table=table, cand=cand, last=torch.full_like(cand, -1), fold=torch.zeros(1, dtype=torch.int32), flat=torch.zeros(1, dtype=torch.int32),
                               taken=torch.zeros(C + 1, dtype=torch.bool), scratch=torch.zeros(C, dtype=torch.int32),
                               served=torch.zeros(L, E, dtype=torch.int8),
                               filled=torch.full((L, E), -1, dtype=torch.int32), layout=None)
        a, b = state(), state()
        live = torch.rand(T) > 0.3 if trial % 2 else None
        for layer in range(L):
            ids = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
            ga, _, ca = group_pairs(a, layer, ids, live, fused=False)
            gb, _, cb = group_pairs(b, layer, ids, live, fused=True)
            for x, y in zip((*ga, ca), (*gb, cb)):
                assert torch.equal(x.to(torch.int32), y.to(torch.int32)), (trial, layer)
        assert torch.equal(a.served, b.served) and torch.equal(a.filled, b.filled)
        assert torch.equal(a.taken[:C], b.taken[:C])
    print("ok")
    """
)


@needs_triton
def test_fused_route_equals_torch_ops() -> None:
    run_interpreted(SCRIPT)
