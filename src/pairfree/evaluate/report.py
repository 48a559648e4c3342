"""Evaluate COCO-format predictions into a paper-style report (JSON + markdown table)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pairfree.clip.base import ClipEncoder
from pairfree.errors import BadInputError, PairfreeError
from pairfree.evaluate.chair import chair_scores, ground_truth
from pairfree.evaluate.clipscore import clip_scores_per_image
from pairfree.evaluate.coco import (
    METRICS,
    caption_metrics,
    format_ids,
    nocaps_groups,
    nocaps_metrics,
)
from pairfree.evaluate.spice import spice_status
from pairfree.io import atomic_write_json, atomic_write_text

# (score key, column header) in the papers' order; B@2/B@3 stay in the JSON only.
COLUMNS = (
    ("Bleu_1", "B@1"),
    ("Bleu_4", "B@4"),
    ("METEOR", "M"),
    ("ROUGE_L", "R"),
    ("CIDEr", "C"),
    ("SPICE", "S"),
    ("CLIPScore", "CLIP-S"),
    ("RefCLIPScore", "RefCLIP-S"),
    ("CHAIR_i", "CHAIR-i"),
    ("CHAIR_s", "CHAIR-s"),
)


@dataclass
class EvaluationReport:
    """Scores x100 per group (``"overall"``, or the NoCaps domains plus ``"overall"``) and
    notes on anything that qualifies them (a metric unavailable, empty captions)."""

    scores: dict[str, dict[str, float | None]]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"scores": self.scores, "notes": list(self.notes)}

    def to_markdown(self) -> str:
        present = {key for group in self.scores.values() for key in group}
        columns = [(key, header) for key, header in COLUMNS if key in present]
        rows = [
            [name, *(format_score(group.get(key)) for key, _ in columns)]
            for name, group in self.scores.items()
        ]
        table = markdown_table(["group", *(header for _, header in columns)], rows)
        notes = "".join(f"\n- {note}" for note in self.notes)
        return f"{table}\n{notes}".rstrip() + "\n"

    def write(self, out_prefix: str | Path) -> tuple[Path, Path]:
        """Write ``<out_prefix>.json`` and ``<out_prefix>.md``, each atomically."""
        json_path, md_path = Path(f"{out_prefix}.json"), Path(f"{out_prefix}.md")
        atomic_write_json(json_path, self.to_json())
        atomic_write_text(md_path, self.to_markdown())
        return json_path, md_path


def format_score(value: float | None) -> str:
    """A score cell: one decimal, or "n/a" for a metric that does not apply."""
    return "n/a" if value is None or value != value else f"{value:.1f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, labels: int = 1) -> str:
    """The one markdown table writer: the first ``labels`` columns left-aligned (names), the
    rest right-aligned (numbers)."""
    align = ["---"] * labels + ["---:"] * (len(header) - labels)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def evaluate(
    predictions: list[dict],
    references: Mapping[str, Sequence[str]],
    *,
    domains: Mapping[str, str] | None = None,
    clip: ClipEncoder | None = None,
    images: Mapping[str, Image.Image] | None = None,
    spice_dir: str | Path | None = None,
    metrics: Sequence[str] = METRICS,
    instances: Mapping[str, set[str]] | None = None,
    chair_references: bool = True,
) -> EvaluationReport:
    """Score COCO results (``[{"image_id", "caption"}]``) against ``references``.

    Image ids are compared as strings. With ``domains`` (image id -> NoCaps domain) scores are
    given per domain and overall. With ``clip`` and ``images`` (image id -> image) CLIPScore
    and RefCLIPScore are added to every group. With ``instances`` (image id -> its annotated
    COCO categories) CHAIR-i and CHAIR-s are added to every group, against the instances and
    the objects the references mention (the paper's ground truth; ``chair_references=False``
    keeps the instances alone).
    """
    captions = predictions_by_id(predictions)
    if instances is not None:
        truth = ground_truth(instances, references if chair_references else None)
        unannotated = [i for i in captions if i not in truth]
        if unannotated:  # checked before the slow metrics run
            raise PairfreeError(
                f"CHAIR: no instance annotations for image ids {format_ids(unannotated)}; give "
                "the instances file of the split these images come from (Karpathy's val and "
                "test images are in instances_val2014.json)"
            )
    notes = []
    empty = [i for i, caption in captions.items() if not caption.strip()]
    if empty:
        notes.append(
            f"{len(empty)} empty caption(s) scored as empty: image ids {format_ids(empty)}"
        )
    if "SPICE" in metrics:
        available, message = spice_status(spice_dir)
        if not available:
            notes.append(message)

    if domains is None:
        groups = {"overall": list(captions)}
        scores = {
            "overall": caption_metrics(captions, references, metrics=metrics, spice_dir=spice_dir)
        }
    else:
        groups = nocaps_groups(captions, domains)
        scores = nocaps_metrics(captions, references, domains, metrics=metrics, spice_dir=spice_dir)

    if clip is not None:
        if images is None:
            raise PairfreeError("CLIPScore needs the images: pass images={image_id: PIL image}")
        by_id = {str(i): image for i, image in images.items()}
        missing = [i for i in captions if i not in by_id]
        if missing:
            raise PairfreeError(f"no image for CLIPScore for image ids {format_ids(missing)}")
        refs = {str(i): r for i, r in references.items()}
        ids = list(captions)
        per_image = clip_scores_per_image(
            clip, [by_id[i] for i in ids], [captions[i] for i in ids], [refs[i] for i in ids]
        )
        row = {i: n for n, i in enumerate(ids)}
        for name, members in groups.items():
            index = torch.tensor([row[i] for i in members], dtype=torch.long)
            for metric, values in per_image.items():
                scores[name][metric] = 100.0 * float(values[index].mean()) if members else None
    if instances is not None:
        for name, members in groups.items():
            chair = chair_scores({i: captions[i] for i in members}, truth)
            scores[name] |= {key: chair[key] for key in ("CHAIR_i", "CHAIR_s")}
    return EvaluationReport(scores=scores, notes=notes)


def predictions_by_id(predictions: list[dict]) -> dict[str, str]:
    """``{image_id as str: caption}``; malformed entries and duplicate ids are errors, since a
    dropped or doubled image would silently change every corpus-level score."""
    captions: dict[str, str] = {}
    for n, item in enumerate(predictions):
        source = f"predictions[{n}]"
        if not isinstance(item, Mapping) or "image_id" not in item:
            raise BadInputError(source, "expected an object with 'image_id' and 'caption'")
        image_id = str(item["image_id"])
        if not isinstance(item.get("caption"), str):
            raise BadInputError(source, "'caption' must be a string", item_id=image_id)
        if image_id in captions:
            raise BadInputError(source, "duplicate image_id", item_id=image_id)
        captions[image_id] = item["caption"]
    return captions
