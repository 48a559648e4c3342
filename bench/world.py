"""Recipes x settings in the shapes world, mean +- std over seeds (the README's world table).

Settings: in-domain (train on the default world's corpus, test on its images), cross-domain
(same models, test on the shifted world, as COCO -> Flickr30k), novel objects (train on the
novel world's corpus, whose held-out shape and color words never occur in it; test on its
images, which contain them). Every model is trained from scratch on text only.

    python bench/world.py                       # 3 seeds, demo-sized training
    python bench/world.py --seeds 1 --steps 200 # a quick look
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

from pairfree.clip import load_clip
from pairfree.demo import (
    CLIP_COLUMNS,
    COCO_COLUMNS,
    DEMO_METHODS,
    TRUTH_COLUMNS,
    DemoConfig,
    Method,
    TestSet,
    caption_test_set,
    score,
    train_methods,
    world_for,
)

METHODS = (
    *DEMO_METHODS,
    Method("no noise + DeCap projection", {"noise.variance": 0.0}, project=True),
)
# train preset -> (setting name, test preset)
SETTINGS = {
    "default": (("in-domain", "default"), ("cross-domain", "shifted")),
    "novel": (("novel objects", "novel"),),
}
COLUMNS = COCO_COLUMNS + CLIP_COLUMNS + TRUTH_COLUMNS[:3]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench-world")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=DemoConfig.steps)
    parser.add_argument("--corpus", type=int, default=DemoConfig.n_corpus)
    parser.add_argument("--test-images", type=int, default=DemoConfig.n_test)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    scores: dict[tuple[str, str], list[dict]] = defaultdict(list)
    seconds: dict[str, list[float]] = defaultdict(list)
    start = time.time()
    clip = None
    for seed in range(args.seeds):
        for train_preset, settings in SETTINGS.items():
            cfg = DemoConfig(out=args.out, preset=train_preset, seed=seed, steps=args.steps,
                             n_corpus=args.corpus, n_test=args.test_images)  # fmt: skip
            trained = train_methods(cfg, METHODS, progress=False)
            clip = clip or load_clip(cfg.clip)
            for setting, test_preset in settings:
                test = TestSet.load(world_for(cfg, test_preset))
                embeds = clip.encode_images(list(test.images.values()))
                for method in METHODS:
                    checkpoint, train_s = trained[method.training_key]
                    captions = caption_test_set(cfg, method, checkpoint, test, clip, embeds)
                    scores[(method.name, setting)].append(score(captions, test, clip))
                    seconds[method.name].append(train_s)
    print(f"{args.seeds} seeds, {args.steps} steps, corpus {args.corpus}, {args.test_images} test images; "
          f"total {time.time() - start:.0f} s")  # fmt: skip
    print("| method | setting | " + " | ".join(label for _, label in COLUMNS) + " | train s |")
    print("|---|---|" + "---:|" * (len(COLUMNS) + 1))
    for (method, setting), runs in scores.items():
        cells = []
        for key, _ in COLUMNS:
            values = [r[key] for r in runs if r.get(key) is not None]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.1f} ± {std:.1f}" if values else "n/a")
        print(
            f"| {method} | {setting} | "
            + " | ".join(cells)
            + f" | {statistics.mean(seconds[method]):.0f} |"
        )


if __name__ == "__main__":
    main()
