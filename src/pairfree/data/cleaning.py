"""Corpus cleaning: the caption filters and normalizations recipes apply before encoding.

Text-only recipes learn the style of their corpus, so what goes in (length, casing, duplicates,
stray punctuation) is part of the recipe's configuration rather than an ad-hoc script.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from pairfree.errors import PairfreeError

# A sentence ends at . ! or ? (plus closing quotes or brackets) followed by whitespace and a
# capital, digit or opening quote; titles such as "Mr." do not end one. Requiring the capital
# keeps "e.g. a dog" and "3.5 m" whole, at the price of not splitting all-lowercase text.
_TITLES = ("Mr", "Mrs", "Ms", "Dr", "Prof", "St", "Jr", "Sr", "vs")
_SENTENCE_END = re.compile(
    "".join(rf"(?<!\b{title})" for title in _TITLES)
    + r"([.!?]+[\"'\u201d\u2019)\]]*)\s+(?=[\"'\u201c\u2018(\[]?[A-Z0-9])"
)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# Punctuation to drop: anything neither a word character nor whitespace, except apostrophes
# and hyphens inside a word ("man's", "t-shirt").
_PUNCTUATION = re.compile(r"[^\w\s'\u2019-]|(?<!\w)['\u2019-]|['\u2019-](?!\w)")


@dataclass
class CleaningConfig:
    """Which captions to keep and how to normalize them; the defaults change nothing but
    whitespace and drop only empty captions.

    ``min_words``/``max_words`` filter (never truncate) by the word count after cleaning;
    ``dedupe`` keeps the first occurrence of each cleaned caption.
    """

    min_words: int = 0
    max_words: int | None = None
    dedupe: bool = False
    strip_punctuation: bool = False
    first_sentence: bool = False
    lowercase: bool = False
    sentence_case: bool = False  # capital first letter, "." added where no ".!?" ends it (ViECap)

    def __post_init__(self) -> None:
        if self.min_words < 0:
            raise PairfreeError(f"min_words must be >= 0, got {self.min_words}")
        if self.max_words is not None and self.max_words < max(self.min_words, 1):
            raise PairfreeError(
                f"max_words must be >= max(min_words, 1), got max_words={self.max_words} "
                f"with min_words={self.min_words}"
            )


def split_sentences(text: str) -> list[str]:
    """Split running text into sentences, whitespace-normalized; blank lines always separate."""
    sentences = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = " ".join(paragraph.split())
        if paragraph:
            sentences.extend(_SENTENCE_END.sub("\\1\n", paragraph).split("\n"))
    return sentences


def clean_caption(text: str, config: CleaningConfig) -> str:
    """One caption normalized by ``config`` (no filtering); may come back empty."""
    if config.first_sentence:
        sentences = split_sentences(text)
        text = sentences[0] if sentences else ""
    if config.strip_punctuation:
        text = _PUNCTUATION.sub(" ", text)
    if config.lowercase:
        text = text.lower()
    text = " ".join(text.split())
    if config.sentence_case and text:
        text = text[0].upper() + text[1:] + ("" if text.endswith((".", "!", "?")) else ".")
    return text


def clean_captions(texts: Iterable[str], config: CleaningConfig) -> list[str]:
    """Normalize and filter captions, in their original order."""
    kept = []
    seen: set[str] = set()
    for text in texts:
        text = clean_caption(text, config)
        words = len(text.split())
        if words == 0 or words < config.min_words:
            continue
        if config.max_words is not None and words > config.max_words:
            continue
        if config.dedupe:
            if text in seen:
                continue
            seen.add(text)
        kept.append(text)
    return kept
