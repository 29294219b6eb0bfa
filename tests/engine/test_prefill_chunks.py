"""A prefill whose activations would not fit the device budget's reserve runs in blocks of prompt columns
(``engine/prefill_chunks.py``): the blocks' inputs, the column count, and on the static path (CPU) the same greedy
tokens as one whole-prompt forward, with padded prompts and a sliding-window family."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moeflow import LLM, SamplingParams
from moeflow.engine.prefill_chunks import activation_bytes_per_token, chunk_inputs, columns
from moeflow.inputs import prefill_inputs
from moeflow.sampling import SamplingParams as Params
from moeflow.sequence import Sequence
from tests.test_engine import PROMPT


def test_chunk_inputs_cuts_left_padded_prompts_by_column() -> None:
    seqs = [Sequence(0, "", [11, 12, 13, 14, 15], Params()), Sequence(1, "", [21, 22, 23], Params())]
    x = prefill_inputs(seqs, torch.device("cpu"))  # width 5: the second prompt starts at column 2
    live, first = chunk_inputs(x, seqs, 0, 2)
    assert [s.request_id for s in live] == [0]  # the second has only padding there
    assert first.new_tokens == [[11, 12]] and first.new_positions == [[0, 1]]
    assert first.ids.shape == (2, 2) and first.mask.shape == (2, 2)
    assert first.keep is not None and first.keep.tolist() == [True, True, False, False]
    live, rest = chunk_inputs(x, seqs, 2, 5)
    assert [s.request_id for s in live] == [0, 1]
    assert rest.new_tokens == [[13, 14, 15], [21, 22, 23]]
    assert rest.new_positions == [[2, 3, 4], [0, 1, 2]]
    assert rest.keep is None and rest.mask.shape == (2, 5)
    assert rest.positions.tolist() == [[2, 3, 4], [0, 1, 2]]


def test_columns_fit_the_room() -> None:
    assert columns(room=10**9, rows=2, per_token=100, width=7) == 7
    assert columns(room=2 * 100 * 3, rows=2, per_token=100, width=7) == 3
    assert columns(room=0, rows=2, per_token=100, width=7) == 1


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])  # gpt-oss: sliding-window layers
def test_chunked_prefill_gives_the_whole_prefills_tokens(checkpoints: dict[str, Path], family: str) -> None:
    path = checkpoints[family]
    prompts = [PROMPT[0] * 3, PROMPT[0][:4], [9, 8, 7, 6, 5, 4, 3]]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    whole = LLM(path, device="cpu", num_slots=4, decode="static", progress=False, batch_size=3)
    want = [o.token_ids for o in whole.generate(prompts, params)]
    assert whole.steps.index == 1 + 5  # one prefill step, then one step per further token
    kv = sum(b.kv.bytes() for b in whole.static._buckets.values())
    (bucket,) = whole.static._buckets.values()
    per_token = activation_bytes_per_token(whole.loaded, bucket.kv.max_len)
    width = len(prompts[0])
    # a reserve that holds the KV cache and the activations of 4 columns of the 3 prompts
    llm = LLM(path, device="cpu", num_slots=4, decode="static", progress=False, batch_size=3,
              kv_reserve=kv + 3 * 4 * per_token)  # fmt: skip
    got = [o.token_ids for o in llm.generate(prompts, params)]
    assert got == want
    blocks = llm.steps.index - 5
    assert blocks >= -(-width // 4) and blocks > 1, blocks
