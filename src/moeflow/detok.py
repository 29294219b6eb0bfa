"""Incremental detokenisation: the text of a growing list of token ids, each step decoding only the last few tokens
(not the whole output again, which is quadratic in its length). Text is append-only: a piece that ends in an
incomplete character (U+FFFD) is held back until the tokens that complete it arrive, or until ``flush``."""

from __future__ import annotations

from typing import Any

from moeflow.sequence import Sequence


class IncrementalText:
    """``push`` a token, get the output's text so far; ``flush`` at the end adds what was held back."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0
        """Start of the tokens decoded as context (their text is already emitted)."""
        self.read = 0
        """End of the tokens whose text is emitted."""
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer is not None else ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text

    def flush(self) -> str:
        """The text with any held-back tail (an incomplete character decodes as U+FFFD)."""
        if self.read < len(self.ids):
            before = self._decode(self.ids[self.prefix : self.read])
            after = self._decode(self.ids[self.prefix :])
            self.text += after[len(before) :]
            self.prefix = self.read = len(self.ids)
        return self.text


def extend_text(tokenizer: Any, eos_ids: set[int], seq: Sequence, token: int) -> str:
    """``seq``'s output text with ``token`` added (its ``detok`` made on first use); all of it, held-back tail
    included, when ``token`` ends the sequence by its length or end-of-sequence."""
    if seq.detok is None:
        seq.detok = IncrementalText(tokenizer)
    text = seq.detok.push(token)
    eos = token in eos_ids and not seq.params.ignore_eos
    return seq.detok.flush() if eos or len(seq.output_ids) + 1 >= seq.params.max_tokens else text
