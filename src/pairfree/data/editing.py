"""Corpus editing options of CapDec's code: gender rebalancing and open-text mixing."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from pairfree.data.cleaning import split_sentences
from pairfree.errors import PairfreeError

# Word pairs for gender rebalancing; female->male maps "her" to "his".
GENDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"),
    ("he", "she"), ("his", "her"), ("him", "her"), ("himself", "herself"),
    ("male", "female"), ("males", "females"), ("father", "mother"), ("fathers", "mothers"),
    ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"),
    ("brothers", "sisters"), ("husband", "wife"), ("king", "queen"), ("gentleman", "lady"),
    ("gentlemen", "ladies"), ("guy", "gal"), ("guys", "gals"), ("boyfriend", "girlfriend"),
    ("uncle", "aunt"), ("nephew", "niece"), ("groom", "bride"), ("dad", "mom"),
    ("grandfather", "grandmother"), ("grandpa", "grandma"), ("businessman", "businesswoman"),
    ("policeman", "policewoman"), ("gentleman's", "lady's"), ("man's", "woman's"),
)  # fmt: skip
MALE_TO_FEMALE = {m: f for m, f in GENDER_PAIRS}
FEMALE_TO_MALE = {f: m for m, f in reversed(GENDER_PAIRS)}
GENDER_MODES = ("none", "both", "male-only", "female-only")
_WORD = re.compile(r"[A-Za-z']+")


def _swap(text: str, table: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        word = m.group(0)
        out = table.get(word.lower())
        if out is None:
            return word
        return out.capitalize() if word[0].isupper() else out

    return _WORD.sub(repl, text)


def rebalance_gender(texts: Sequence[str], mode: str, p: float = 0.5, seed: int = 0) -> list[str]:
    """Swap gendered words with probability ``p`` per caption, in the directions of ``mode``.

    ``both``: male captions become female and female ones male; ``male-only``: only captions
    with male words are swapped (to female); ``female-only``: only female ones (to male).
    """
    if mode not in GENDER_MODES:
        raise PairfreeError(f"unknown gender mode {mode!r}: expected one of {GENDER_MODES}")
    if mode == "none":
        return list(texts)
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = {w.lower() for w in _WORD.findall(text)}
        is_male = bool(words & MALE_TO_FEMALE.keys())
        is_female = bool(words & FEMALE_TO_MALE.keys())
        table = None
        if is_male and not is_female and mode in ("both", "male-only"):
            table = MALE_TO_FEMALE
        elif is_female and not is_male and mode in ("both", "female-only"):
            table = FEMALE_TO_MALE
        out.append(_swap(text, table) if table is not None and rng.random() < p else text)
    return out


def open_text_sentences(path: str | Path, min_words: int = 4, max_words: int = 20) -> list[str]:
    """Sentences of ``min_words``..``max_words`` words from any plain-text file."""
    path = Path(path)
    if not path.exists():
        raise PairfreeError(f"open-text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [s for s in split_sentences(text) if min_words <= len(s.split()) <= max_words]


def mix_open_text(
    captions: Sequence[str], sentences: Sequence[str], ratio: float, seed: int = 0
) -> list[str]:
    """Append ``round(ratio * len(captions))`` open-text sentences sampled without replacement."""
    n = min(len(sentences), round(ratio * len(captions)))
    return list(captions) + random.Random(seed).sample(list(sentences), n)
