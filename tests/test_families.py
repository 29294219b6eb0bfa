"""Every family of the installed transformers whose experts use the experts interface runs in moeflow exactly.

The families are discovered in transformers, not listed; each gets the same tiny random config (tests/families.py),
is saved with ``save_pretrained`` (so its experts are on disk as transformers' conversion mapping writes them),
and moeflow's logits and greedy tokens must equal transformers' with the smallest legal slot pool (top-k) and a
host pool smaller than all experts. ``python -m tests.test_families`` rewrites the README's list from this test.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from moeflow import LLM, SamplingParams
from moeflow.errors import RequestError
from moeflow.model.families import interface_model_types
from moeflow.model.loader import open_model
from tests.families import save_random, tiny_config

PROMPT = [5, 17, 42, 7, 99, 3, 250, 11, 64, 8]
NEW_TOKENS = 6
HOST_EXPERTS = 3

XFAIL: dict[str, str] = {
    "dots3_note": "multimodal: its vision and audio towers check widths the shared tiny tower does not meet (e.g. "
    "adapter_input_size against the audio hidden size); its text model dots3_note_text passes",
    "gemma4": "multimodal wrapper (vision and audio towers); its text model gemma4_text is the MoE",
}

FOUND = interface_model_types()


def expected_to_pass() -> list[str]:
    return [t for t in FOUND if t not in XFAIL]


def _param(model_type: str) -> object:
    reason = XFAIL.get(model_type)
    if reason is None:
        return model_type
    return pytest.param(model_type, marks=pytest.mark.xfail(reason=reason, run=model_type != "gemma4"))


@pytest.mark.parametrize("model_type", [_param(t) for t in FOUND])
def test_family_matches_transformers(model_type: str, tmp_path: Path) -> None:
    path = save_random(tiny_config(model_type), tmp_path / model_type)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # transformers' own loading
    with torch.no_grad():
        want_logits = ref(torch.tensor([PROMPT])).logits
    out = ref.generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    want_tokens = out[0, len(PROMPT) :].tolist()
    probe = open_model(str(path), torch.device("cpu"), "float32")
    total = len(probe.layers) * probe.num_experts
    assert total > HOST_EXPERTS
    llm = LLM(
        path,
        device="cpu",
        dtype="float32",
        num_slots=probe.top_k,
        host_memory=HOST_EXPERTS * probe.expert_bytes,
        progress=False,
    )
    assert llm.store.num_slots == probe.top_k and llm.store.host.shape[0] == HOST_EXPERTS
    with torch.no_grad():
        got = llm.loaded.model(torch.tensor([PROMPT])).logits
    torch.testing.assert_close(got, want_logits, rtol=1e-4, atol=1e-5)
    result = llm.generate([PROMPT], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0]
    assert result.token_ids == want_tokens
    assert result.stats.misses > 0
    try:  # the static decode step (the one a GPU captures in a graph), run eagerly
        static = LLM(
            path, device="cpu", dtype="float32", num_slots=probe.top_k, decode="static", progress=False
        )
    except RequestError as err:  # refused on purpose: state the static cache or the kernel cannot hold
        assert "not available for this model" in str(err) and (
            "cache holds" in str(err) or "slot-table" in str(err)
        )
        return
    again = static.generate([PROMPT], SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True))[0]
    assert again.token_ids == want_tokens


# ---------------------------------------------------------------------------------------------------- README list
README = Path(__file__).parent.parent / "README.md"
BLOCK = re.compile(r"<!-- families: (?P<version>\S+) -->\n(?P<body>.*?)<!-- /families -->", re.S)


def readme_block() -> str:
    names = ", ".join(f"`{t}`" for t in expected_to_pass())
    return f"<!-- families: {transformers.__version__} -->\n{names}\n<!-- /families -->"


def test_readme_lists_the_families_that_pass() -> None:
    match = BLOCK.search(README.read_text())
    assert match, "README.md lacks the generated families block"
    if match["version"] != transformers.__version__:
        pytest.skip(f"the README's list was generated with transformers {match['version']}")
    assert match.group(0) == readme_block(), (
        "run `python -m tests.test_families` to regenerate the README list"
    )


if __name__ == "__main__":
    text = README.read_text()
    if not BLOCK.search(text):
        sys.exit("README.md lacks a '<!-- families: VERSION -->' ... '<!-- /families -->' block")
    README.write_text(BLOCK.sub(lambda _: readme_block(), text))
    print(f"README.md: {len(expected_to_pass())} families (transformers {transformers.__version__})")
