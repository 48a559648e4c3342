"""One config, one paper row: train -> caption the test split -> evaluate.

This is the one runner of an experiment; ``pairfree run``, the demo and ``bench/world.py`` all
go through it. An experiment YAML is a recipe config plus two keys of its own::

    recipe: capdec
    evaluation: {dataset: data/dataset_coco.json, split: test, image_root: data/coco}
    corpus: {path: data/dataset_coco.json}
    train: {output_dir: runs/capdec-coco}
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pairfree.clip import ClipEncoder
from pairfree.config import apply_overrides, from_dict, read_yaml
from pairfree.data import dataset_images, load_images
from pairfree.errors import PairfreeError, SkipLog
from pairfree.evaluate import METRICS, EvaluationReport, evaluate
from pairfree.io import atomic_write_json, check_output
from pairfree.locks import output_lock
from pairfree.pipeline import Captioner
from pairfree.recipes import get_recipe
from pairfree.training.trainer import TrainResult


@dataclass
class EvaluationConfig:
    dataset: str = ""  # Karpathy/COCO/NoCaps JSON with the images to caption and references
    split: str = "test"
    image_root: str | None = None
    allow_outside_root: bool = False  # read file names leading out of image_root (links)
    project_to: str | None = None  # text feature store for DeCap projection at inference
    tau: float = 0.01
    checkpoint: str = "best"  # "best" or "last"
    device: str = "auto"  # where the test split is captioned: auto is the GPU when there is one
    clip_score: bool = False
    spice_dir: str | None = None
    batch_size: int = 64


@dataclass
class TestSet:
    """The readable images of a dataset split with their references, loaded once."""

    images: dict[str, Image.Image]
    references: dict[str, list[str]]
    domains: dict[str, str] | None = None  # NoCaps: image id -> domain
    skipped: SkipLog = field(default_factory=SkipLog)
    _embeddings: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    _grids: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        dataset: str | Path,
        *,
        split: str = "test",
        image_root: str | Path | None = None,
        allow_outside_root: bool = False,
    ) -> TestSet:
        """Unreadable images, and those outside the image root, are skipped and listed in
        ``skipped``; the rest are scored."""
        skipped = SkipLog()
        items = dataset_images(
            dataset,
            split=split,
            image_root=image_root,
            allow_outside_root=allow_outside_root,
            skip_log=skipped,
        )
        ids, images = load_images([(it.image_id, it.path) for it in items], skipped)
        kept = set(ids)
        if not kept:
            raise PairfreeError(f"{dataset}: no readable images in split {split!r}")
        references = {it.image_id: list(it.references) for it in items if it.image_id in kept}
        domains = {it.image_id: it.domain for it in items if it.image_id in kept and it.domain}
        return cls(dict(zip(ids, images, strict=True)), references, domains or None, skipped)

    def embeddings(self, clip: ClipEncoder) -> torch.Tensor:
        """The images' CLIP embeddings, computed once per encoder."""
        if clip.name not in self._embeddings:
            self._embeddings[clip.name] = clip.encode_images(list(self.images.values()))
        return self._embeddings[clip.name]

    def grids(self, captioner: Captioner) -> torch.Tensor:
        """What a cross-attention captioner reads of the images (CLIP grid features, or
        pixels for its own image tower), computed once per kind; with the CLIP embeddings in
        the same pass where the captioner reads both."""
        vision = getattr(captioner.model, "vision", None)
        key = captioner.clip.name if vision is None else repr(vision.pixels)
        if key not in self._grids:
            images = list(self.images.values())
            if vision is None and captioner.needs_embeddings and key not in self._embeddings:
                self._embeddings[key], self._grids[key] = captioner.image_inputs(images)
            else:
                self._grids[key] = captioner.grids(images)
        return self._grids[key]


def train_recipe(
    recipe: str, config: Any, *, resume: bool = True, progress: bool = True
) -> TrainResult:
    """Train ``config`` with the registered recipe ``recipe``."""
    return get_recipe(recipe).train(config, resume=resume, progress=progress)


def caption_test_set(
    captioner: Captioner, test: TestSet, *, batch_size: int = 64
) -> dict[str, str]:
    """Image id -> caption for every test image."""
    grid = test.grids(captioner) if captioner.needs_grid else None
    second = captioner.retrieval_clip  # IFCap's retrieval CLIP, where it has one
    texts = captioner.caption_embeddings(
        test.embeddings(captioner.clip),
        grid=grid,
        retrieval_embeds=None if second is None else test.embeddings(second),
        batch_size=batch_size,
    )
    return dict(zip(test.images, texts, strict=True))


def score_captions(
    captions: Mapping[str, str],
    test: TestSet,
    *,
    clip: ClipEncoder | None = None,
    spice_dir: str | None = None,
    metrics: Sequence[str] = METRICS,
    by_domain: bool = True,
) -> EvaluationReport:
    """COCO metrics (also per NoCaps domain if ``by_domain`` and the test set has domains),
    CLIPScore with ``clip``, and a note on any image the test set skipped."""
    report = evaluate(
        [{"image_id": i, "caption": c} for i, c in captions.items()],
        test.references,
        domains=test.domains if by_domain else None,
        clip=clip,
        images=test.images if clip is not None else None,
        spice_dir=spice_dir,
        metrics=metrics,
    )
    if test.skipped:
        report.notes.append(test.skipped.summary())
    return report


def run_experiment(
    config_path: str | Path, overrides: Sequence[str] = (), *, progress: bool = True
) -> EvaluationReport:
    """Run the whole experiment; every stage resumes or reuses what an earlier run left. The
    run folder (``train.output_dir``) stays locked throughout (:func:`output_lock`), so a
    second run or ``pairfree train`` into it is refused instead of mixing in."""
    data = apply_overrides(read_yaml(config_path), overrides)
    recipe_name = data.pop("recipe", None)
    if recipe_name is None:
        raise PairfreeError(f"{config_path}: missing `recipe:` (e.g. recipe: capdec)")
    recipe = get_recipe(recipe_name)
    ev = from_dict(EvaluationConfig, data.pop("evaluation", {}), where="evaluation")
    if not ev.dataset:
        raise PairfreeError(f"{config_path}: evaluation.dataset is not set")
    if not Path(ev.dataset).is_file():
        raise PairfreeError(f"evaluation.dataset: {ev.dataset} does not exist")
    cfg = recipe.build_config(data)
    check_output(Path(cfg.train.output_dir), folder=True)
    with output_lock(cfg.train.output_dir):
        result = recipe.train(cfg, progress=progress)

        ckpt = result.best_dir if ev.checkpoint == "best" and result.best_dir else result.last_dir
        captioner = Captioner.from_pretrained(
            ckpt, project_to=ev.project_to, tau=ev.tau, device=ev.device
        )
        test = TestSet.load(
            ev.dataset,
            split=ev.split,
            image_root=ev.image_root,
            allow_outside_root=ev.allow_outside_root,
        )
        captions = caption_test_set(captioner, test, batch_size=ev.batch_size)
        out = Path(cfg.train.output_dir)
        atomic_write_json(
            out / f"captions_{ev.split}.json",
            [{"image_id": i, "caption": c} for i, c in captions.items()],
        )
        report = score_captions(
            captions, test, clip=captioner.clip if ev.clip_score else None, spice_dir=ev.spice_dir
        )
        report.write(out / f"metrics_{ev.split}")
        return report
