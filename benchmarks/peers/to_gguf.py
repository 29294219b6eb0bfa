"""Convert a moeflow synthetic checkpoint to a bf16 GGUF with llama.cpp's own converter (a benchmark peer's input).

The synthetic checkpoints carry no tokenizer, and llama.cpp's converter needs one. This script gives the converter
a view of the checkpoint (a folder of links beside the output, the checkpoint itself left as it is) plus the demo
model's byte-level BPE tokenizer (models/demo, 8192 tokens; the rest of the vocabulary becomes llama.cpp's
``[PAD<i>]`` entries) into the checkpoint and tells the converter that its pre-tokenizer is GPT-2's (the demo
tokenizer's ByteLevel regex is GPT-2's), which the converter cannot find out on its own: it recognises
pre-tokenizers only by hashing the token ids of a fixed text against a list of published models. Nothing else in
the conversion changes; the benchmarks feed token ids, so the vocabulary's content does not matter.

    python3 benchmarks/peers/to_gguf.py --llama-cpp .work/llama.cpp --model /dev/shm/olmoe --out /dev/shm/olmoe.gguf
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--llama-cpp", required=True, help="unpacked llama.cpp tree (holds convert_hf_to_gguf.py)"
    )
    ap.add_argument("--model", required=True, help="moeflow synth checkpoint directory")
    ap.add_argument("--out", required=True, help="GGUF file to write")
    ap.add_argument("--outtype", default="bf16")
    args = ap.parse_args()
    root, model = Path(args.llama_cpp).resolve(), Path(args.model)
    view = Path(args.out + ".src")
    shutil.rmtree(view, ignore_errors=True)
    view.mkdir(parents=True)
    for f in model.iterdir():
        if f.is_file() and (
            f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json")
        ):
            (view / f.name).symlink_to(f.resolve())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / name, view / name)
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import convert_hf_to_gguf  # llama.cpp's converter, imported as a module of the unpacked tree
    from conversion import ModelBase, get_model_class

    arch = ModelBase.load_hparams(view, False)["architectures"][0]
    base = get_model_class(arch)

    class Gpt2PreTokenizer(base):  # type: ignore[misc, valid-type]
        """The converter's model class for ``arch``, told the tokenizer's pre-tokenizer instead of hashing it."""

        model_arch = base.model_arch

        def get_vocab_base_pre(self, tokenizer: object) -> str:
            return "gpt-2"

    ModelBase.register(arch)(
        Gpt2PreTokenizer
    )  # the converter's own registry: its main() now picks this class
    sys.argv = [sys.argv[0], str(view), "--outfile", args.out, "--outtype", args.outtype]
    try:
        convert_hf_to_gguf.main()
    finally:
        shutil.rmtree(view, ignore_errors=True)


if __name__ == "__main__":
    main()
