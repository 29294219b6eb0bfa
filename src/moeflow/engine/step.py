"""What every forward step does around the model, on any path: it opens with the step's context for the MoE layers,
the policy's ``begin_step`` and the recorder's; it closes with ``end_step``; and its sampled tokens are settled into
the sequences (replayed text followed, stop conditions, ``end_request`` for the finished)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from moeflow.experts.cache import StepInfo
from moeflow.experts.layer import Runtime, StaticBuffers, StepContext
from moeflow.sequence import Sequence


class Steps:
    """Counts the engine's forward steps and makes the calls that open and close each one."""

    def __init__(self, runtime: Runtime):
        self.rt = runtime
        self.index = 0

    def begin(
        self,
        live: list[Sequence],
        tokens: list[list[int]],
        positions: list[list[int]],
        prefill: bool,
        keep: torch.Tensor | None = None,
        static: StaticBuffers | None = None,
        on_layer: Callable[[int], None] | None = None,
    ) -> None:
        """A step of ``live`` sequences feeding ``tokens`` at ``positions`` starts."""
        rt = self.rt
        ids = [s.request_id for s in live]
        rows = rt.replay.rows(ids, positions) if rt.replay is not None else None
        rt.ctx = StepContext(self.index, prefill, keep, rows, static, on_layer)
        info = StepInfo(self.index, tuple(ids), tuple(tuple(t) for t in tokens), tuple(p[0] for p in positions),
                        prefill)  # fmt: skip
        rt.policy.begin_step(info)
        if rt.recorder is not None:
            rt.recorder.begin_step(self.index, ids, positions, tokens, prefill)

    def begin_decode(
        self, seqs: list[Sequence], live: list[int], static: StaticBuffers | None = None
    ) -> None:
        """A decode step of the ``live`` rows of ``seqs`` starts: each feeds its last token at its position."""
        self.begin([seqs[i] for i in live], [[seqs[i].output_ids[-1]] for i in live],
                   [[seqs[i].position] for i in live], False, None, static)  # fmt: skip

    def end(self) -> None:
        """The step's forward is done (a forward outside the engine's steps then runs eagerly)."""
        self.rt.ctx = StepContext(step=self.index + 1)
        self.rt.policy.end_step()
        if self.rt.recorder is not None:
            self.rt.recorder.end_step()
        self.index += 1

    def settle(
        self, seqs: list[Sequence], tokens: list[int], text: Callable[[Sequence, int], str], eos_ids: set[int]
    ) -> None:
        """Append each unfinished sequence's sampled token (the recorded one where a replayed trace has it);
        ``text(seq, token)`` is the sequence's output text with the token added."""
        replay = self.rt.replay
        for seq, token in zip(seqs, tokens):
            if replay is not None:  # follow the recorded text where the trace has it
                recorded = replay.token(seq.request_id, seq.position + 1)
                token = token if recorded is None else recorded
            if not seq.finished:
                seq.append(token, text(seq, token), eos_ids)
                if seq.finished:
                    self.rt.policy.end_request(seq.request_id)
