"""Recipes x settings in the shapes world, mean +- std over seeds (the README's world table).

Settings: the cluttered COCO-like world (``--presets coco``, the default and main table): train
there (its captions name a salient few of each image's objects) and test on its images
(cluttered), on its cross-domain partner's (``coco-shifted``: other object, setting and
caption frequencies, as COCO -> Flickr30k) and on its NoCaps-like partner's (``coco-novel``:
objects of two shapes and two colors the corpus and the training images never hold). With
``--presets default,novel``, the sparse worlds of the first table: in-domain (train on the
default world, test on its images), cross-domain (same models, test on the shifted world, as
COCO -> Flickr30k) and novel objects (train on the novel world's corpus, whose held-out shape
and color words never occur in it; test on its images, which contain them). Every model is
trained from scratch: the text-only ones on the corpus, the GANs on the corpus plus the
world's unpaired training images, each beside its own text-only initialization, the paired
upper bound on captioned training images (not in the sparse novel-object setting), SaCap with its
three ablations on synthetic images of the corpus and on SynC's re-assignment of them, ICSD
with its single-context ablation (also on SynC's re-assignment) on synthetic images of LLM
summaries of caption groups (the world's text-to-image model and LLM), and (cluttered world) ViECap with its two ablations and IFCap with its three on the
corpus, PCM-Net with its two ablations on the synthetic images and on SynC's re-assignment of
them. Every world is read
by the shipped world CLIP v2, trained on all four.

CIDEr is given with its 95 % confidence interval (bootstrap over test images and seeds), and
each method is compared with CapDec (noise 0.016) on the same images and seeds (a paired
bootstrap of per-image CIDEr-D): the difference with its interval, marked * where the interval
excludes 0. A second table compares each ablation with its full recipe, each GAN with its
own initialization, and each full recipe with the paired upper bound the same way. The last lines say how large the standard error of a
difference from CapDec is, how much of it comes from test images and how much from training
seeds, and how many of each would bring it to 3 CIDEr. Every run's per-image CIDEr is written
to ``<out>/world-table.json``.

    python bench/world.py                        # the cluttered world, 2 processes
    python bench/world.py --seeds 1 --steps 200 --gan-steps 60   # a quick look
    python bench/world.py --recipes sacap        # only some recipes' rows (each run is seeded:
                                                 # the rows equal those of a full run)
    python bench/world.py --methods "SaCap;SaCap + SynC"   # only these rows
    python bench/world.py --presets default,novel  # the sparse worlds' settings
    python bench/world.py --from-tables A/world-table.json B/world-table.json  # rows of two
                                                 # invocations (same worlds, seeds) compared
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from pairfree.demo import (
    GAN_METHODS,
    ICSD_METHODS,
    IFCAP_METHODS,
    PAIRED_UPPER_BOUND,
    PCMNET_METHODS,
    SACAP_METHODS,
    TEXT_METHODS,
    VIECAP_METHODS,
    DemoConfig,
    run_methods,
)
from pairfree.demo.report import CLIP_COLUMNS, COCO_COLUMNS, TRUTH_COLUMNS
from pairfree.evaluate import markdown_table
from pairfree.evaluate.coco import per_image_scores
from pairfree.evaluate.stats import (
    VarianceParts,
    bootstrap_mean,
    paired_bootstrap,
    variance_parts,
)
from pairfree.experiment import TestSet
from pairfree.world.lm import build_world_bert, build_world_encoder, build_world_lm

# train preset -> (methods, ((setting name, test preset), ...))
SETTINGS = {
    "default": (
        (*TEXT_METHODS, PAIRED_UPPER_BOUND, *GAN_METHODS, *SACAP_METHODS, *ICSD_METHODS),
        (("in-domain", "default"), ("cross-domain", "shifted")),
    ),
    "novel": ((*TEXT_METHODS, *SACAP_METHODS, *ICSD_METHODS), (("novel objects", "novel"),)),
    "coco": (
        (
            *TEXT_METHODS,
            PAIRED_UPPER_BOUND,
            *GAN_METHODS,
            *SACAP_METHODS,
            *ICSD_METHODS,
            *VIECAP_METHODS,
            *IFCAP_METHODS,
            *PCMNET_METHODS,
        ),  # fmt: skip
        (
            ("cluttered", "coco"),
            ("cluttered cross-domain", "coco-shifted"),
            ("cluttered novel objects", "coco-novel"),
        ),
    ),
}
TRUTH = ("object_precision", "object_recall", "salient_recall", "chair_i")
COLUMNS = COCO_COLUMNS + CLIP_COLUMNS + tuple(c for c in TRUTH_COLUMNS if c[0] in TRUTH)
BASELINE = TEXT_METHODS[0].name  # CapDec, noise 0.016: every other method is compared with it
# what each method varies, for the within-recipe comparisons: ablation -> full recipe, and
# GAN -> its own initialization (the text-only ablations are already compared with CapDec)
VARIES = {
    **{m.name: SACAP_METHODS[0].name for m in SACAP_METHODS[1:]},
    **{m.name: ICSD_METHODS[0].name for m in ICSD_METHODS[1:]},
    **{m.name: ICSD_METHODS[1].name for m in ICSD_METHODS if m.reassigned},  # its images, SynC'd
    **{m.name: VIECAP_METHODS[0].name for m in VIECAP_METHODS[1:]},
    **{m.name: IFCAP_METHODS[0].name for m in IFCAP_METHODS[1:]},
    **{m.name: PCMNET_METHODS[0].name for m in PCMNET_METHODS[1:]},
    **{gan.name: init.name for init, gan in zip(GAN_METHODS[::2], GAN_METHODS[1::2], strict=True)},
}
# each recipe as published (and on SynC's re-assignment), compared with the paired upper
# bound as well
BOUND = PAIRED_UPPER_BOUND.name
FULL_RECIPES = (
    BASELINE,
    SACAP_METHODS[0].name,
    ICSD_METHODS[0].name,
    *(g.name for g in GAN_METHODS[1::2]),
    VIECAP_METHODS[0].name,
    IFCAP_METHODS[0].name,
    PCMNET_METHODS[0].name,
    *(m.name for m in (*SACAP_METHODS, *ICSD_METHODS, *PCMNET_METHODS) if m.reassigned),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-world")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=2, help="seeds run in parallel processes")
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--gan-steps", type=int, default=DemoConfig.gan_steps)
    parser.add_argument("--corpus", type=int, default=DemoConfig.n_corpus)
    parser.add_argument("--test-images", type=int, default=500)
    parser.add_argument("--recipes", default=None, help="comma-separated: only these recipes")
    parser.add_argument("--methods", default=None,
                        help="';'-separated method names (as the table's rows): only these")  # fmt: skip
    parser.add_argument("--presets", default="coco",
                        help="comma-separated training worlds: coco (the cluttered world, the "
                        "main table), default (in- and cross-domain settings), novel (novel "
                        "objects)")  # fmt: skip
    parser.add_argument("--from-tables", nargs="+", metavar="JSON",
                        help="train nothing: print the table of earlier runs' world-table.json "
                        "files together (same worlds and seeds; a later file's rows win)")  # fmt: skip
    parser.add_argument("--clip", default="world:v2",
                        help="the world CLIP (default: the shipped v2, trained on every world; "
                        "world:builtin, the tests' CLIP, reads the sparse worlds only)")  # fmt: skip
    return parser.parse_args()


def run_seed(args: argparse.Namespace, seed: int) -> tuple[dict, dict, dict]:
    """Every method and setting for one seed: (method, setting) -> scores, method -> seconds,
    (method, setting) -> per-image CIDEr-D in the order of the test images' ids."""
    import torch

    torch.set_num_threads(1)  # one core per seed process
    scores, seconds, per_image = {}, {}, {}
    for train_preset, (all_methods, settings) in SETTINGS.items():
        if train_preset not in args.presets.split(","):
            continue
        methods = all_methods
        if args.recipes:
            methods = [m for m in methods if m.recipe in args.recipes.split(",")]
        if args.methods:
            methods = [m for m in methods if m.name in args.methods.split(";")]
        if not methods:
            continue
        cfg = DemoConfig(out=args.out, preset=train_preset, seed=seed, steps=args.steps,
                         gan_steps=args.gan_steps, n_corpus=args.corpus,
                         n_test=args.test_images, clip=args.clip)  # fmt: skip
        # the world of a full run, whichever recipes run: the same files, features and rows
        if any(m.needs_images for m in all_methods):
            cfg = cfg.with_images()
        setting_of = {preset: setting for setting, preset in settings}
        references = {}
        for r in run_methods(cfg, methods, test_presets=list(setting_of), progress=False):
            key = (r.method, setting_of[r.test_preset])
            scores[key] = r.scores
            seconds[r.method] = r.train_seconds
            if r.test_preset not in references:
                test = TestSet.load(cfg.world(r.test_preset).dataset, split="test")
                references[r.test_preset] = test.references
            cider = per_image_scores(r.captions, references[r.test_preset])
            per_image[key] = [cider[i] for i in sorted(cider)]
    return scores, seconds, per_image


def cider_cells(
    per_image: dict[tuple[str, str], list[list[float]]], method: str, setting: str
) -> tuple[str, str, float | None]:
    """CIDEr-D with its 95 % interval, the paired difference from the baseline (with a * where
    its interval excludes 0), and that difference's standard error."""
    values = per_image[(method, setting)]
    cell = str(bootstrap_mean(values))
    baseline = per_image.get((BASELINE, setting))
    if method == BASELINE or baseline is None:
        return cell, "", None
    c = paired_bootstrap(values, baseline)
    d = c.difference
    mark = "*" if c.significant else ""
    return cell, f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]{mark}", d.stderr


def print_table(
    scores: dict[tuple[str, str], list[dict]],
    seconds: dict[str, list[float]],
    per_image: dict[tuple[str, str], list[list[float]]],
) -> None:
    """The world table: one row per (method, setting), CIDEr with its interval and its paired
    difference from CapDec, the other metrics as mean ± std over seeds."""
    rows, stderrs = [], []
    for (method, setting), runs in scores.items():
        cells = []
        for key, _ in COLUMNS:
            if key == "CIDEr":
                cell, difference, stderr = cider_cells(per_image, method, setting)
                cells += [cell, difference]
                stderrs += [] if stderr is None else [stderr]
                continue
            values = [r[key] for r in runs if r.get(key) is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}" if values else "n/a")
        took = seconds.get(method)
        rows.append([method, setting, *cells, f"{statistics.mean(took):.0f}" if took else "n/a"])
    labels = [label for key, label in COLUMNS for label in
              ((f"{label} [95 % CI]", "ΔC vs CapDec") if key == "CIDEr" else (label,))]  # fmt: skip
    header = ["method", "setting", *labels, "train s"]
    print(markdown_table(header, rows, labels=2))
    if stderrs:
        print(f"standard error of a difference from CapDec: median {statistics.median(stderrs):.2f}"
              f", largest {max(stderrs):.2f} CIDEr")  # fmt: skip
    print_plan(per_image)


def print_plan(per_image: dict[tuple[str, str], list[list[float]]], target: float = 3.0) -> None:
    """Where the error of a difference from CapDec comes from and how many test images and
    seeds would bring it to ``target``. Each part is pooled over methods (the root of its mean
    variance): with few seeds one method's seed part is often estimated as 0."""
    parts = []
    for (method, setting), values in per_image.items():
        baseline = per_image.get((BASELINE, setting))
        if method != BASELINE and baseline is not None and len(values) > 1:
            parts.append(variance_parts(np.asarray(values) - np.asarray(baseline)))
    if not parts:
        return
    pooled = VarianceParts(*(float(np.sqrt(np.mean([getattr(p, name) ** 2 for p in parts])))
                             for name in ("image", "seed", "noise")))  # fmt: skip
    plan = pooled.plan(target)
    needs = (f"about {plan[1]} test images with {plan[0]} seed{'s' * (plan[0] > 1)}" if plan
             else "more than 32 seeds")  # fmt: skip
    print(f"its parts (sd pooled over methods): image {pooled.image:.1f}, seed "
          f"{pooled.seed:.1f}, rest {pooled.noise:.1f} CIDEr; a standard error of {target:g} "
          f"needs {needs}")  # fmt: skip


def print_within_recipes(per_image: dict[tuple[str, str], list[list[float]]]) -> None:
    """Each ablation against its full recipe, each GAN against its initialization, and each
    full recipe against the paired upper bound, paired over the same images and seeds: what
    the world table's CapDec column cannot show."""
    rows = []
    pairs = [(m, s, VARIES.get(m)) for m, s in per_image]
    pairs += [(m, s, BOUND) for m, s in per_image if m in FULL_RECIPES]
    for method, setting, reference in pairs:
        if (reference, setting) not in per_image:
            continue
        c = paired_bootstrap(per_image[(method, setting)], per_image[(reference, setting)])
        d = c.difference
        mark = "*" if c.significant else ""
        rows.append([f"{method} − {reference}", setting,
                     f"{d.mean:+.1f} [{d.low:+.1f}, {d.high:+.1f}]{mark}"])  # fmt: skip
    if rows:
        print(markdown_table(["comparison", "setting", "ΔC [95 % CI]"], rows, labels=2))


def read_tables(paths: list[str]) -> tuple[dict, dict, dict]:
    """Rows of earlier runs' ``world-table.json`` files (a later file's row replaces an
    earlier one's), so that separate invocations on the same worlds and seeds compare paired."""
    scores, seconds, per_image = {}, {}, {}
    for path in paths:
        for row in json.loads(Path(path).read_text(encoding="utf-8")):
            key = (row["method"], row["setting"])
            scores[key], per_image[key] = row["scores"], row["per_image_cider"]
            if row.get("train_seconds"):
                seconds[row["method"]] = row["train_seconds"]
    return scores, seconds, per_image


def main() -> None:
    args = parse_args()
    if args.from_tables:
        scores, seconds, per_image = read_tables(args.from_tables)
        print_table(scores, seconds, per_image)
        print_within_recipes(per_image)
        return
    known = {m.name for methods, _ in SETTINGS.values() for m in methods}
    unknown = sorted(set(args.methods.split(";")) - known) if args.methods else []
    if unknown:
        raise SystemExit(f"--methods: no method named {', '.join(map(repr, unknown))}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    start = time.time()
    # the untrained world LMs and discriminator encoder, shared by every seed: made once here
    build_world_lm(Path(args.out) / "world-lm")
    build_world_encoder(Path(args.out) / "world-encoder")
    build_world_bert(Path(args.out) / "world-bert")
    scores: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    per_image: dict[tuple[str, str], list[list[float]]] = defaultdict(list)
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        seeds = pool.map(run_seed, [args] * args.seeds, range(args.seeds))
        for seed_scores, seed_seconds, seed_per_image in seeds:
            for key, value in seed_scores.items():
                scores[key].append(value)
            for key, value in seed_seconds.items():
                seconds[key].append(value)
            for key, value in seed_per_image.items():
                per_image[key].append(value)
    table = [{"method": m, "setting": s, "scores": runs, "per_image_cider": per_image[(m, s)],
              "train_seconds": seconds[m]} for (m, s), runs in scores.items()]  # fmt: skip
    (Path(args.out) / "world-table.json").write_text(json.dumps(table), encoding="utf-8")
    print(f"{args.seeds} seeds, {args.steps} steps (GAN phase {args.gan_steps}), corpus "
          f"{args.corpus}, {args.test_images} test images; total {time.time() - start:.0f} s "
          f"with {args.jobs} processes")  # fmt: skip
    print_table(scores, seconds, per_image)
    print_within_recipes(per_image)


if __name__ == "__main__":
    main()
