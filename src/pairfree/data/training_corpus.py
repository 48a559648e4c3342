"""The corpus a recipe trains on: where it is and how it is read, cleaned and extended
(``corpus.*`` in every recipe's config), and the captions that come out."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pairfree.data.cleaning import CleaningConfig, clean_captions
from pairfree.data.corpus import Caption, read_captions
from pairfree.data.editing import mix_open_text, open_text_sentences
from pairfree.errors import PairfreeError, SkipLog


@dataclass
class CorpusConfig:
    path: str = ""  # any corpus reader format (Karpathy JSON, COCO, CC TSV, txt, JSONL)
    format: str = "auto"
    split: str = "train"
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    gender: str = "none"  # none | both | male-only | female-only (in the text CLIP encodes)
    gender_p: float = 0.5  # chance that a gendered word takes the other gender's form
    open_text: str | None = None  # a plain-text file to draw 4-20-word sentences from
    open_text_ratio: float = 0.0  # open sentences added per corpus caption
    seed: int = 0  # draws the gender flips and the open-text sample
    val_fraction: float = 0.01  # captions held out for the validation loss
    max_tokens: int = 40  # longer captions are truncated


def check_corpus(corpus: CorpusConfig, name: str = "corpus") -> None:
    """Fail in a second on a corpus that is not there, before any model is loaded (``name``:
    where the config holds it)."""
    if not corpus.path:
        raise PairfreeError(f"{name}.path is not set: give the caption corpus to train on")
    for key, path in ((f"{name}.path", corpus.path), (f"{name}.open_text", corpus.open_text)):
        if path and not Path(path).is_file():
            raise PairfreeError(f"{key}: {path} does not exist")


def prepare_corpus(corpus: CorpusConfig, skip_log: SkipLog) -> list[Caption]:
    """Read, clean and extend the corpus: the exact captions the model will be trained on
    (unreadable lines go to ``skip_log``)."""
    check_corpus(corpus)
    captions = read_captions(
        corpus.path, format=corpus.format, split=corpus.split, skip_log=skip_log
    )
    texts = clean_captions((cap.text for cap in captions), corpus.cleaning)
    if corpus.open_text:
        sentences = open_text_sentences(corpus.open_text)
        texts = mix_open_text(texts, sentences, corpus.open_text_ratio, seed=corpus.seed)
    return [Caption(text=t, image_id=None, source=corpus.path, line=None) for t in texts]
