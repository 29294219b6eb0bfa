"""Train the demo model's byte-level BPE tokenizer and turn the corpus into token arrays.

Reads ``DATA/corpus/{code,prose}-{train,test}.jsonl`` (from ``prepare_corpus.py``), trains a byte-level BPE with the
``tokenizers`` library on the training split only, saves it as a ``PreTrainedTokenizerFast`` into ``--tokenizer-dir``
(so ``AutoTokenizer.from_pretrained(dir)`` loads it), and writes ``DATA/tokens/{domain}-{split}.npy`` (uint16 [N]):
every document preceded by ``<|endoftext|>`` (which the tokenizer also puts before every encoded prompt).

Usage: ``python training/train_tokenizer.py --data .data/demo --tokenizer-dir models/demo``
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

EOS = "<|endoftext|>"
DOMAINS = ("code", "prose")


def read_docs(path: Path) -> list[str]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def build_tokenizer(texts: Iterator[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE whose post-processor prepends ``<|endoftext|>`` to each sequence."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    eos_id = tok.token_to_id(EOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, eos_id)]
    )
    return tok


def wrap(tok: Tokenizer, max_length: int) -> PreTrainedTokenizerFast:
    """The ``transformers`` wrapper saved next to the model."""
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, model_max_length=max_length
    )


def encode_docs(tok: Tokenizer, docs: list[str]) -> np.ndarray:
    """uint16 [N]: the documents' tokens, each document starting with ``<|endoftext|>``."""
    ids = [np.asarray(e.ids, dtype=np.uint16) for e in tok.encode_batch(docs)]
    return np.concatenate(ids) if ids else np.zeros(0, np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=".data/demo")
    ap.add_argument("--tokenizer-dir", default="models/demo")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--max-length", type=int, default=2048)
    args = ap.parse_args()
    data = Path(args.data)
    docs = {(d, s): read_docs(data / "corpus" / f"{d}-{s}.jsonl") for d in DOMAINS for s in ("train", "test")}
    train_texts = (t for d in DOMAINS for t in docs[(d, "train")])
    tok = build_tokenizer(train_texts, args.vocab_size)
    assert tok.get_vocab_size() <= 65536, "uint16 token arrays need a vocabulary below 65536"
    wrap(tok, args.max_length).save_pretrained(args.tokenizer_dir)
    (data / "tokens").mkdir(parents=True, exist_ok=True)
    stats = {}
    for (domain, part), texts in docs.items():
        arr = encode_docs(tok, texts)
        np.save(data / "tokens" / f"{domain}-{part}.npy", arr)
        chars = sum(len(t) for t in texts)
        stats[f"{domain}-{part}"] = {
            "tokens": int(arr.size),
            "chars_per_token": round(chars / max(arr.size, 1), 3),
        }
        print(f"{domain}-{part}: {arr.size} tokens, {chars / max(arr.size, 1):.2f} chars/token")
    (data / "tokens" / "stats.json").write_text(json.dumps({"args": vars(args), "splits": stats}, indent=1))


if __name__ == "__main__":
    main()
