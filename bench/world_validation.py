"""Choose a world-scale setting on the world's validation split, never on its test scenes.

Trains one recipe under each variant of its settings (the world bench's config plus the
variant's overrides) on a world, captions that world's *validation* images with each, and
prints each variant's CIDEr-D with its 95 % interval and its paired difference from the first
variant (bootstrap over the same images and seeds). The validation images share nothing with
the test images the world table scores.

    python bench/world_validation.py --recipe sacap \\
        --variant "hidden 2048: model.soft_prompt_hidden=2048" \\
        --variant "hidden 344: model.soft_prompt_hidden=344"
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

from pairfree.demo import DemoConfig, Method
from pairfree.demo.run import train_methods
from pairfree.evaluate import markdown_table
from pairfree.evaluate.coco import per_image_scores
from pairfree.evaluate.stats import bootstrap_mean, paired_bootstrap
from pairfree.experiment import TestSet, caption_test_set
from pairfree.pipeline import Captioner
from pairfree.world.lm import build_world_bert, build_world_encoder, build_world_lm


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", required=True, help="capdec, sacap, icsd, cgtgan, scst-gan")
    parser.add_argument("--variant", action="append", required=True, metavar="NAME: K=V,K=V",
                        help="a named set of config overrides (repeat; the first is the "
                        "reference)")  # fmt: skip
    parser.add_argument("--artifact", default="last", help="the checkpoint scored (GANs: best)")
    parser.add_argument("--preset", default="coco")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--val-images", type=int, default=500)
    parser.add_argument("--steps", type=int, default=DemoConfig.steps, help="training steps")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel processes")
    parser.add_argument("--clip", default="world:v2")
    parser.add_argument("--out", default="runs/world-validation")
    return parser.parse_args()


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, settings = text.partition(":")
    overrides = {}
    for item in filter(None, (s.strip() for s in settings.split(","))):
        key, _, value = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(value.strip())  # as the CLI reads K=V
    return name.strip(), overrides


def run_one(args: argparse.Namespace, name: str, overrides: dict, seed: int) -> list[float]:
    """Train one variant on one seed; its per-image CIDEr-D on the validation images."""
    import torch

    torch.set_num_threads(1)
    cfg = DemoConfig(out=args.out, preset=args.preset, seed=seed, n_val=args.val_images,
                     steps=args.steps, clip=args.clip)  # fmt: skip
    method = Method(name, overrides, recipe=args.recipe, artifact=args.artifact)
    if method.needs_images:
        cfg = cfg.with_images(n_val=args.val_images)
    run, _ = train_methods(cfg, [method], progress=False)[method.training_key]
    captioner = Captioner.from_pretrained(run / method.artifact, clip=cfg.clip)
    val = TestSet.load(cfg.world().dataset, split="val")
    cider = per_image_scores(caption_test_set(captioner, val), val.references)
    return [cider[i] for i in sorted(cider)]


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    build_world_lm(Path(args.out) / "world-lm")
    build_world_encoder(Path(args.out) / "world-encoder")
    build_world_bert(Path(args.out) / "world-bert")
    variants = [parse_variant(v) for v in args.variant]
    tasks = [(name, overrides, seed) for name, overrides in variants for seed in range(args.seeds)]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args, *task) for task in tasks]
        results = [f.result() for f in futures]
    per_image = {name: [] for name, _ in variants}
    for (name, _, _), values in zip(tasks, results, strict=True):
        per_image[name].append(values)
    reference = variants[0][0]
    rows = []
    for name, values in per_image.items():
        difference = ""
        if name != reference:
            c = paired_bootstrap(values, per_image[reference])
            d = c.difference
            difference = f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]{'*' * c.significant}"
        rows.append([name, str(bootstrap_mean(values)), difference])
    print(f"{args.recipe} on the {args.preset} world's {args.val_images} validation images, "
          f"{args.seeds} seed(s); {time.time() - start:.0f} s with {args.jobs} processes")  # fmt: skip
    print(markdown_table(["variant", "val CIDEr [95 % CI]", f"Δ vs {reference}"], rows, labels=1))
    (Path(args.out) / f"{args.recipe}-validation.json").write_text(
        json.dumps({name: values for name, values in per_image.items()}), encoding="utf-8"
    )


if __name__ == "__main__":
    main()
