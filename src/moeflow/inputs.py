"""Model inputs of one step: left-padded prefill or one-token decode, with positions and the real-token mask.

Legend: B sequences, S padded prompt length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.sequence import Sequence


@dataclass
class StepInputs:
    ids: torch.Tensor  # [B, S] (prefill) or [B, 1] (decode)
    mask: torch.Tensor  # [B, past + new] attention mask
    positions: torch.Tensor  # [B, S] or [B, 1]
    keep: torch.Tensor | None  # [B * S] or [B]: rows of real tokens of unfinished sequences; None = all rows
    new_tokens: list[list[int]]  # per live sequence, the tokens fed this step
    new_positions: list[list[int]]  # per live sequence, their positions
    prefill: bool


def prefill_inputs(seqs: list[Sequence], device: torch.device) -> StepInputs:
    width = max(len(s.prompt_ids) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, width - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
        mask[b, width - len(s.prompt_ids) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    keep = mask.bool().flatten()
    return StepInputs(
        ids.to(device),
        mask.to(device),
        pos.to(device),
        None if bool(keep.all()) else keep.to(device),
        [s.prompt_ids for s in seqs],
        [list(range(len(s.prompt_ids))) for s in seqs],
        prefill=True,
    )


def decode_inputs(seqs: list[Sequence], mask: torch.Tensor, device: torch.device) -> StepInputs:
    live = [s for s in seqs if not s.finished]
    ones = torch.ones(len(seqs), 1, dtype=mask.dtype, device=mask.device)
    return StepInputs(
        torch.tensor([[s.output_ids[-1]] for s in seqs]).to(device),
        torch.cat([mask, ones], dim=1),
        torch.tensor([[s.position] for s in seqs]).to(device),
        None if len(live) == len(seqs) else torch.tensor([not s.finished for s in seqs]).to(device),
        [[s.output_ids[-1]] for s in live],
        [[s.position] for s in live],
        prefill=False,
    )
