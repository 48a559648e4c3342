"""An object-phrase vocabulary from a caption corpus, for hard prompts (SaCap).

SaCap reads its phrases from a file it does not ship. Without a part-of-speech tagger (none
works offline here), the phrases are word n-grams (1 to ``max_words`` words) that neither
begin nor end with a function word and hold no digit, counted over the corpus; the most
frequent ones are kept. In captions ("a man riding a wave on a surfboard") this keeps "man",
"wave", "surfboard" and "riding a wave" alike: nouns and noun phrases dominate by frequency,
and a verb phrase in a prompt costs little. A hand-made vocabulary (one phrase per line) can
be given instead.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from pairfree.errors import BadInputError

FUNCTION_WORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "with",
        "by",
        "from",
        "up",
        "down",
        "over",
        "under",
        "into",
        "onto",
        "near",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "has",
        "have",
        "had",
        "do",
        "does",
        "did",
        "it",
        "its",
        "this",
        "that",
        "these",
        "those",
        "there",
        "their",
        "his",
        "her",
        "he",
        "she",
        "they",
        "we",
        "you",
        "i",
        "me",
        "my",
        "our",
        "your",
        "some",
        "any",
        "each",
        "every",
        "other",
        "another",
        "one",
        "two",
        "three",
        "four",
        "five",
        "very",
        "while",
        "as",
        "than",
        "then",
        "so",
        "not",
        "no",
        "off",
        "out",
    ]
)
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


def corpus_phrases(
    texts: Iterable[str], *, max_phrases: int = 1000, max_words: int = 3, min_count: int = 2
) -> list[str]:
    """The most frequent candidate phrases of ``texts`` (see the module docstring), most
    frequent first, ties in first-seen order."""
    counts: Counter[str] = Counter()
    for text in texts:
        words = _WORD.findall(text.lower())
        for n in range(1, max_words + 1):
            for i in range(len(words) - n + 1):
                gram = words[i : i + n]
                if gram[0] in FUNCTION_WORDS or gram[-1] in FUNCTION_WORDS:
                    continue
                counts[" ".join(gram)] += 1
    frequent = [(p, c) for p, c in counts.items() if c >= min_count]
    frequent.sort(key=lambda pc: -pc[1])  # stable: ties keep first-seen order
    return [p for p, _ in frequent[:max_phrases]]


def read_phrases(path: str | Path) -> list[str]:
    """A vocabulary file: one phrase per line; blank lines are ignored, duplicates dropped."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "missing: the object-phrase vocabulary (one phrase per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise BadInputError(path, f"not UTF-8 text: {err}") from err
    phrases = list(dict.fromkeys(line.strip() for line in lines if line.strip()))
    if not phrases:
        raise BadInputError(path, "holds no phrase")
    return phrases
