"""One config, one paper row: encode (cached) -> train -> caption the test split -> evaluate.

An experiment YAML is a recipe config plus two keys of its own::

    recipe: capdec
    evaluation: {dataset: data/dataset_coco.json, split: test, image_root: data/coco}
    corpus: {path: data/dataset_coco.json}
    train: {output_dir: runs/capdec-coco}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pairfree.config import from_dict
from pairfree.errors import PairfreeError, SkipLog
from pairfree.io import atomic_write_json


@dataclass
class EvaluationConfig:
    dataset: str = ""  # Karpathy/COCO/NoCaps JSON with the images to caption and references
    split: str = "test"
    image_root: str | None = None
    project_to: str | None = None  # text feature store for DeCap projection at inference
    tau: float = 0.01
    checkpoint: str = "best"  # "best" or "last"
    clip_score: bool = False
    spice_dir: str | None = None
    batch_size: int = 64


def run_experiment(config_path: str | Path, overrides: list[str] = (), *, progress: bool = True):
    """Run the whole experiment; every stage resumes or reuses what an earlier run left."""
    from pairfree.commands.train import resolve
    from pairfree.config import apply_overrides, read_yaml
    from pairfree.data import load_image, read_images
    from pairfree.errors import BadInputError
    from pairfree.evaluate import evaluate
    from pairfree.pipeline import Captioner

    data = apply_overrides(read_yaml(config_path), overrides)
    recipe = data.pop("recipe", None)
    if recipe is None:
        raise PairfreeError(f"{config_path}: missing `recipe:` (e.g. recipe: capdec)")
    ev = from_dict(EvaluationConfig, data.pop("evaluation", {}), where="evaluation")
    if not ev.dataset:
        raise PairfreeError(f"{config_path}: evaluation.dataset is not set")
    cfg, train = resolve(recipe, data, [])
    result = train(cfg, progress=progress)

    ckpt = result.best_dir if ev.checkpoint == "best" and result.best_dir else result.last_dir
    captioner = Captioner.from_pretrained(ckpt, project_to=ev.project_to, tau=ev.tau)
    skip_log = SkipLog()
    items = read_images(ev.dataset, split=ev.split, image_root=ev.image_root, skip_log=skip_log)
    images = {}
    for it in items:
        try:
            images[it.image_id] = load_image(it.path)
        except BadInputError as err:
            skip_log.skip(err)
    ids = list(images)
    captions = captioner.caption([images[i] for i in ids], batch_size=ev.batch_size)
    predictions = [{"image_id": i, "caption": c} for i, c in zip(ids, captions, strict=True)]
    out = Path(cfg.train.output_dir)
    atomic_write_json(out / f"captions_{ev.split}.json", predictions)
    references = {it.image_id: list(it.references) for it in items if it.image_id in images}
    domains = {it.image_id: it.domain for it in items if it.domain} or None
    report = evaluate(
        predictions,
        references,
        domains=domains,
        clip=captioner.clip if ev.clip_score else None,
        images=images if ev.clip_score else None,
        spice_dir=ev.spice_dir,
    )
    if skip_log:
        report.notes.append(skip_log.summary())
    report.write(out / f"metrics_{ev.split}")
    return report
