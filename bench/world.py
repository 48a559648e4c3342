"""Recipes x settings in the shapes world, mean +- std over seeds (the README's world table).

Settings: in-domain (train on the default world, test on its images), cross-domain (same
models, test on the shifted world, as COCO -> Flickr30k), novel objects (train on the novel
world's corpus, whose held-out shape and color words never occur in it; test on its images,
which contain them). Every model is trained from scratch: the text-only ones on the corpus,
the GANs on the corpus plus the world's unpaired training images, each beside its own
text-only initialization, the paired upper bound on captioned training images (those three
in- and cross-domain only), SaCap with its three ablations on synthetic images of the
corpus, and ICSD with its single-context ablation on synthetic images of LLM summaries of
caption groups (the world's text-to-image model and LLM).

    python bench/world.py                        # 3 seeds, demo-sized training, 2 processes
    python bench/world.py --seeds 1 --steps 200 --gan-steps 60   # a quick look
    python bench/world.py --recipes sacap        # only some recipes' rows (each run is seeded:
                                                 # the rows equal those of a full run)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from pairfree.demo import (
    GAN_METHODS,
    ICSD_METHODS,
    PAIRED_UPPER_BOUND,
    SACAP_METHODS,
    TEXT_METHODS,
    DemoConfig,
    run_methods,
)
from pairfree.demo.report import CLIP_COLUMNS, COCO_COLUMNS, TRUTH_COLUMNS
from pairfree.evaluate import markdown_table
from pairfree.world.lm import build_world_bert, build_world_encoder, build_world_lm

# train preset -> (methods, ((setting name, test preset), ...))
SETTINGS = {
    "default": (
        (*TEXT_METHODS, PAIRED_UPPER_BOUND, *GAN_METHODS, *SACAP_METHODS, *ICSD_METHODS),
        (("in-domain", "default"), ("cross-domain", "shifted")),
    ),
    "novel": ((*TEXT_METHODS, *SACAP_METHODS, *ICSD_METHODS), (("novel objects", "novel"),)),
}
COLUMNS = COCO_COLUMNS + CLIP_COLUMNS + TRUTH_COLUMNS[:3]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-world")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="seeds run in parallel processes")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--gan-steps", type=int, default=DemoConfig.gan_steps)
    parser.add_argument("--corpus", type=int, default=DemoConfig.n_corpus)
    parser.add_argument("--test-images", type=int, default=DemoConfig.n_test)
    parser.add_argument("--recipes", default=None, help="comma-separated: only these recipes")
    return parser.parse_args()


def run_seed(args: argparse.Namespace, seed: int) -> tuple[dict, dict]:
    """Every method and setting for one seed: (method, setting) -> scores, method -> seconds."""
    import torch

    torch.set_num_threads(1)  # one core per seed process
    scores, seconds = {}, {}
    for train_preset, (methods, settings) in SETTINGS.items():
        if args.recipes:
            methods = [m for m in methods if m.recipe in args.recipes.split(",")]
        if not methods:
            continue
        cfg = DemoConfig(out=args.out, preset=train_preset, seed=seed, steps=args.steps,
                         gan_steps=args.gan_steps, n_corpus=args.corpus,
                         n_test=args.test_images)  # fmt: skip
        if any(m.needs_images for m in methods):
            cfg = cfg.with_images()
        setting_of = {preset: setting for setting, preset in settings}
        for r in run_methods(cfg, methods, test_presets=list(setting_of), progress=False):
            scores[(r.method, setting_of[r.test_preset])] = r.scores
            seconds[r.method] = r.train_seconds
    return scores, seconds


def main() -> None:
    args = parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    # the untrained world LMs and discriminator encoder, shared by every seed: made once here
    build_world_lm(Path(args.out) / "world-lm")
    build_world_encoder(Path(args.out) / "world-encoder")
    build_world_bert(Path(args.out) / "world-bert")
    scores: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for seed_scores, seed_seconds in pool.map(run_seed, [args] * args.seeds, range(args.seeds)):
            for key, value in seed_scores.items():
                scores[key].append(value)
            for key, value in seed_seconds.items():
                seconds[key].append(value)
    print(f"{args.seeds} seeds, {args.steps} steps (GAN phase {args.gan_steps}), corpus "
          f"{args.corpus}, {args.test_images} test images; total {time.time() - start:.0f} s "
          f"with {args.jobs} processes")  # fmt: skip
    rows = []
    for (method, setting), runs in scores.items():
        cells = []
        for key, _ in COLUMNS:
            values = [r[key] for r in runs if r.get(key) is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}" if values else "n/a")
        rows.append([method, setting, *cells, f"{statistics.mean(seconds[method]):.0f}"])
    header = ["method", "setting", *(label for _, label in COLUMNS), "train s"]
    print(markdown_table(header, rows, labels=2))


if __name__ == "__main__":
    main()
