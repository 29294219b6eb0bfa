"""Incremental detokenisation: the pieces add up to the whole decode, an incomplete character is held back, and
stop strings are found across token boundaries while only the new tail is searched."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moeflow.detok import IncrementalText
from moeflow.sampling import SamplingParams
from moeflow.sequence import Sequence


@pytest.fixture(scope="module")
def tokenizer(checkpoints: dict[str, Path]):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoints["olmoe"])


def test_pieces_add_up_to_the_whole_decode(tokenizer) -> None:
    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.integers(0, len(tokenizer) - 1), min_size=1, max_size=40))
    def check(ids: list[int]) -> None:
        inc = IncrementalText(tokenizer)
        texts = [inc.push(t) for t in ids]
        assert all(b.startswith(a) for a, b in pairwise(texts))  # append-only
        assert inc.flush() == tokenizer.decode(ids, skip_special_tokens=True)

    check()


def test_incomplete_character_is_held_back(tokenizer) -> None:
    ids = tokenizer("héllo ü", add_special_tokens=False)["input_ids"]
    inc = IncrementalText(tokenizer)
    texts = [inc.push(t) for t in ids]
    assert all("\ufffd" not in t for t in texts)
    assert texts[-1] == "héllo ü" == inc.flush()


def test_stop_string_across_tokens_with_tail_search() -> None:
    seq = Sequence(0, "", [1], SamplingParams(max_tokens=50, stop=("STOP",)))
    text = ""
    for i, piece in enumerate(["abc S", "T", "", "OP and more"]):
        text += piece
        seq.append(i, text, set())
        if seq.finished:
            break
    assert seq.finish_reason == "stop" and seq.text == "abc " and len(seq.output_ids) == 4
    early = Sequence(0, "", [1], SamplingParams(max_tokens=50, stop=("x", "yy")))
    early.append(0, "ayyx", set())
    assert early.text == "a"  # the earliest stop string wins
