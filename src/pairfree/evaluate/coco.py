"""COCO caption metrics through pycocoevalcap's own scorers and PTB tokenizer.

The numbers equal pycocoevalcap's ``COCOEvalCap`` on the same inputs: same tokenizer, same
scorers, same options (BLEU "closest" reference length, CIDEr-D with sigma 6, METEOR 1.5).
Only the bookkeeping differs: the tokenizer starts a JVM per call, so predictions and
references are tokenized in one call, and NoCaps domains are scored from that one
tokenization. Scores are reported x100, as in the papers.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from pairfree.errors import PairfreeError
from pairfree.evaluate.spice import spice_per_image, spice_status

logger = logging.getLogger(__name__)

METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr", "SPICE")
METRIC_KEYS = {
    "BLEU": ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"),
    "METEOR": ("METEOR",),
    "ROUGE_L": ("ROUGE_L",),
    "CIDEr": ("CIDEr",),
    "SPICE": ("SPICE",),
}
NOCAPS_DOMAINS = ("in-domain", "near-domain", "out-domain")
PER_IMAGE_METRICS = ("CIDEr", "ROUGE_L", "SPICE")  # a corpus score is the mean of these

Scores = dict[str, float | None]


def format_ids(ids: Iterable[object], limit: int = 5) -> str:
    """``'a', 'b' (+3 more)``: enough ids to find the problem without flooding the message."""
    ids = list(ids)
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" (+{len(ids) - limit} more)" if len(ids) > limit else "")


def caption_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    metrics: Sequence[str] = METRICS,
    spice_dir: str | Path | None = None,
) -> Scores:
    """Corpus scores x100 of one caption per image against its references.

    Only images in ``predictions`` are scored. SPICE is ``None`` when its jars are missing
    (see :func:`pairfree.evaluate.spice.spice_status`).
    """
    return _score_groups(predictions, references, None, metrics, spice_dir)["overall"]


def per_image_scores(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    metric: str = "CIDEr",
    spice_dir: str | Path | None = None,
) -> dict[str, float]:
    """Each predicted image's score x100 against its references, for a metric whose corpus
    score is the mean of these (CIDEr-D: document frequencies from the references of the
    predicted images, as in :func:`caption_metrics`; ROUGE-L; SPICE)."""
    if metric not in PER_IMAGE_METRICS:
        raise PairfreeError(f"{metric!r} has no per-image score whose mean is the corpus "
                            f"score; choose from {PER_IMAGE_METRICS}")  # fmt: skip
    predictions, references = _checked(predictions, references)
    res, gts = _tokenize(predictions, references)
    if metric == "SPICE":
        available, message = spice_status(spice_dir)
        if not available:
            raise PairfreeError(message)
        by_id = spice_per_image(gts, res, spice_dir)
        return {i: 100.0 * float(by_id[i]) for i in predictions}
    scorer = Cider() if metric == "CIDEr" else Rouge()
    _, scores = scorer.compute_score(gts, res)  # in the order of gts' keys
    return {i: 100.0 * float(v) for i, v in zip(gts, scores, strict=True)}


def nocaps_groups(image_ids: Iterable[str], domains: Mapping[str, str]) -> dict[str, list[str]]:
    """Split ``image_ids`` by NoCaps domain; ``"overall"`` holds them all."""
    domains = {str(k): v for k, v in domains.items()}
    image_ids = [str(i) for i in image_ids]
    missing = [i for i in image_ids if i not in domains]
    if missing:
        raise PairfreeError(f"no NoCaps domain for image ids {format_ids(missing)}")
    unknown = [i for i in image_ids if domains[i] not in NOCAPS_DOMAINS]
    if unknown:
        raise PairfreeError(
            f"unknown NoCaps domain {domains[unknown[0]]!r} for image ids {format_ids(unknown)}; "
            f"expected one of {NOCAPS_DOMAINS}"
        )
    groups = {d: [i for i in image_ids if domains[i] == d] for d in NOCAPS_DOMAINS}
    groups["overall"] = image_ids
    return groups


def nocaps_metrics(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    domains: Mapping[str, str],
    *,
    metrics: Sequence[str] = METRICS,
    spice_dir: str | Path | None = None,
) -> dict[str, Scores]:
    """NoCaps scores per domain plus overall; each group is scored as its own corpus (CIDEr's
    document frequencies come from the group), like the NoCaps evaluation server. A domain
    without images gets ``None`` scores."""
    groups = nocaps_groups(predictions, domains)
    return _score_groups(predictions, references, groups, metrics, spice_dir)


def _score_groups(
    predictions: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    groups: Mapping[str, Sequence[str]] | None,
    metrics: Sequence[str],
    spice_dir: str | Path | None,
) -> dict[str, Scores]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise PairfreeError(f"unknown metrics {unknown or metrics}; choose from {METRICS}")
    predictions, references = _checked(predictions, references)
    groups = groups if groups is not None else {"overall": list(predictions)}
    res, gts = _tokenize(predictions, references)

    spice = None
    if "SPICE" in metrics:
        available, message = spice_status(spice_dir)
        if available:
            spice = spice_per_image(gts, res, spice_dir)
        else:
            logger.warning(message)
    meteor = meteor_scorer() if "METEOR" in metrics else None

    keys = [key for m in METRICS if m in metrics for key in METRIC_KEYS[m]]
    out: dict[str, Scores] = {}
    for name, ids in groups.items():
        scores: Scores = dict.fromkeys(keys)
        if ids:
            group_gts = {i: gts[i] for i in ids}
            group_res = {i: res[i] for i in ids}
            if "BLEU" in metrics:
                bleu, _ = Bleu(4).compute_score(group_gts, group_res, verbose=0)
                scores.update(zip(METRIC_KEYS["BLEU"], bleu, strict=True))
            if meteor is not None:
                scores["METEOR"] = meteor.compute_score(group_gts, group_res)[0]
            if "ROUGE_L" in metrics:
                scores["ROUGE_L"] = Rouge().compute_score(group_gts, group_res)[0]
            if "CIDEr" in metrics:
                scores["CIDEr"] = Cider().compute_score(group_gts, group_res)[0]
            if spice is not None:
                scores["SPICE"] = np.mean([spice[i] for i in ids])
        out[name] = {k: None if v is None else 100.0 * float(v) for k, v in scores.items()}
    return out


_METEOR: dict[int, Meteor] = {}  # process id -> its METEOR scorer (a Java process)


def meteor_scorer() -> Meteor:
    """This process's METEOR scorer: its Java process starts once (10-15 s) and is reused by
    every later scoring call; a new one replaces it if it died (or after a fork)."""
    pid = os.getpid()
    scorer = _METEOR.get(pid)
    if scorer is None or scorer.meteor_p.poll() is not None:
        _METEOR.clear()
        scorer = _METEOR[pid] = Meteor()
    return scorer


def _checked(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, str], dict[str, list[str]]]:
    """String ids; the references of the predicted images, each a non-empty list of strings."""
    if not predictions:
        raise PairfreeError("no predictions to score")
    preds = {str(i): c for i, c in predictions.items()}
    if len(preds) != len(predictions):
        raise PairfreeError("prediction image ids collide once compared as strings")
    not_str = [i for i, c in preds.items() if not isinstance(c, str)]
    if not_str:
        raise PairfreeError(
            f"prediction captions must be strings; see image ids {format_ids(not_str)}"
        )
    refs = {str(i): r for i, r in references.items()}
    missing = [i for i in preds if not refs.get(i)]
    if missing:
        raise PairfreeError(f"no references for predicted image ids {format_ids(missing)}")
    bad = [
        i for i in preds if isinstance(refs[i], str) or not all(isinstance(r, str) for r in refs[i])
    ]
    if bad:
        raise PairfreeError(f"references must be lists of strings; see image ids {format_ids(bad)}")
    return preds, {i: list(refs[i]) for i in preds}


def _tokenize(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """PTB-tokenize (lower-case, punctuation dropped) predictions and references in one JVM.

    The tokenizer reads one caption per line, so every whitespace run (``\\r``, U+2028 and the
    like, which Java also breaks lines on) becomes one space first; otherwise a caption with a
    stray line break would shift every later caption onto the wrong image.
    """
    if shutil.which("java") is None:
        raise PairfreeError(
            "caption metrics need Java (pycocoevalcap's PTB tokenizer and METEOR run on it): "
            "install a Java runtime (8 or newer) and put `java` on PATH"
        )
    captions = {("res", i): [{"caption": " ".join(c.split())}] for i, c in predictions.items()}
    for i in predictions:
        captions["gts", i] = [{"caption": " ".join(r.split())} for r in references[i]]
    tokens = PTBTokenizer().tokenize(captions)
    return {i: tokens["res", i] for i in predictions}, {i: tokens["gts", i] for i in predictions}
