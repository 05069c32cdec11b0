"""Checks our GGUF tokenizer against llama.cpp's own tokenizer test files.

llama.cpp ships vocabulary-only GGUF files with test texts and their expected ids
(`models/ggml-vocab-<name>.gguf`, `.gguf.inp`, `.gguf.out`; the `llama-cpp-python`
sdist on PyPI carries them under `vendor/llama.cpp/models/`):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && tar xzf llama_cpp_python-0.3.36.tar.gz
    python scripts/check_gguf_vocab.py llama_cpp_python-0.3.36/vendor/llama.cpp/models qwen2

Exit status 1 when any text's ids differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

from hbo_jax.models.gguf import gguf_tokenizer


def main(models_dir: str, name: str) -> int:
    base = Path(models_dir) / f"ggml-vocab-{name}.gguf"
    tok = gguf_tokenizer(base)
    out = Path(f"{base}.out").read_text().splitlines()
    texts = Path(f"{base}.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:len(out)]
    bad = 0
    for text, line in zip(texts, out):
        want = [int(x) for x in line.split()]
        got = tok(text, add_special_tokens=False)["input_ids"]
        if got != want:
            bad += 1
            print(f"differs: {text[:60]!r}: ours {got[:12]} llama.cpp {want[:12]}")
    print(f"{len(out) - bad}/{len(out)} llama.cpp test texts give identical ids ({name}, vocab {len(tok)})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
