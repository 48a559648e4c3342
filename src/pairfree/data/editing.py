"""Corpus editing options of CapDec's code: gender rebalancing (of the text CLIP encodes)
and open-text mixing."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from pairfree.data.cleaning import split_sentences
from pairfree.errors import PairfreeError

# (male, female) word pairs. CapDec's list has 26 columns; every word of it is here, each with
# its right partner (CapDec's columns pair some words wrongly: "boys" with "ladies", "males"
# with "girls", "policeman" with "nun"), plus common words it lacks ("him", "uncle", ...).
GENDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"),
    ("he", "she"), ("his", "her"), ("him", "her"), ("himself", "herself"),
    ("male", "female"), ("males", "females"), ("father", "mother"), ("fathers", "mothers"),
    ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"),
    ("brothers", "sisters"), ("husband", "wife"), ("king", "queen"), ("gentleman", "lady"),
    ("gentlemen", "ladies"), ("guy", "gal"), ("guys", "gals"), ("boyfriend", "girlfriend"),
    ("uncle", "aunt"), ("nephew", "niece"), ("groom", "bride"), ("dad", "mom"),
    ("dads", "moms"), ("grandfather", "grandmother"), ("grandpa", "grandma"),
    ("businessman", "businesswoman"), ("policeman", "policewoman"),
    ("policemen", "policewomen"), ("fireman", "firewoman"), ("firemen", "firewomen"),
    ("actor", "actress"), ("actors", "actresses"), ("monk", "nun"), ("dude", "gal"),
    ("mans", "womans"), ("gentleman's", "lady's"), ("man's", "woman's"),
)  # fmt: skip
MALE_TO_FEMALE = {m: f for m, f in GENDER_PAIRS}
FEMALE_TO_MALE = {f: m for m, f in reversed(GENDER_PAIRS)}
GENDER_MODES = ("none", "both", "male-only", "female-only")
_WORD = re.compile(r"[A-Za-z']+")


def randomize_gender(texts: Sequence[str], mode: str, p: float = 0.5, seed: int = 0) -> list[str]:
    """CapDec's gender rebalancing: in each caption that qualifies, every gendered word
    independently takes the other gender's form with probability ``p``.

    A caption qualifies if it has a gendered word (``both``), a male one (``male-only``) or a
    female one (``female-only``). CapDec applies this to the text it CLIP-encodes only, so the
    decoder learns to say what the caption says whatever gender the embedding suggests; the
    caller keeps the caption itself as the training target. CapDec lowercases and splits on
    spaces, so "man." never matched there; here words are matched without their punctuation
    and keep their capitalization.
    """
    if mode not in GENDER_MODES:
        raise PairfreeError(f"unknown gender mode {mode!r}: expected one of {GENDER_MODES}")
    if mode == "none":
        return list(texts)
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = {w.lower() for w in _WORD.findall(text)}
        qualifies = {
            "both": words & (MALE_TO_FEMALE.keys() | FEMALE_TO_MALE.keys()),
            "male-only": words & MALE_TO_FEMALE.keys(),
            "female-only": words & FEMALE_TO_MALE.keys(),
        }[mode]
        if not qualifies:
            out.append(text)
            continue

        def flip(m: re.Match) -> str:
            word = m.group(0)
            other = MALE_TO_FEMALE.get(word.lower()) or FEMALE_TO_MALE.get(word.lower())
            if other is None or rng.random() >= p:
                return word
            return other.capitalize() if word[0].isupper() else other

        out.append(_WORD.sub(flip, text))
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
