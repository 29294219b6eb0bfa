"""The dense part's details: the CPU output head gets its input with row-major strides (a sliced view made torch's
CPU bf16 linear copy the whole head weight), and the logits are unchanged by it."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.model.dense import standard_strides


def test_head_input_gets_standard_strides_and_same_result() -> None:
    head = nn.Linear(16, 40, bias=False).to(torch.bfloat16)
    hidden = torch.randn(2, 5, 16).to(torch.bfloat16)
    last = hidden[:, -1:, :]  # what transformers hands the head with logits_to_keep=1: strides (80, 16, 1)
    fixed = standard_strides(head, (last,))
    assert fixed is not None and fixed[0].stride() == (16, 16, 1) and torch.equal(fixed[0], last)
    assert standard_strides(head, (hidden,)) is None  # already row-major: no copy
    want = head(last)
    head.register_forward_pre_hook(standard_strides)
    assert torch.equal(head(last), want)
