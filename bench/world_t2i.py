"""How a world CLIP reads the world's text-to-image images, against real renders of the same
scenes, and how often the world's text-to-image model departs from its prompt.

For each held-out scene (the world CLIP's fixed evaluation set) there are three images: the
real render (the baseline), the same scene in the synthetic style, and what the world's
text-to-image backend draws from the scene's caption (with Stable Diffusion's mistakes).
Each is scored by image -> caption R@1 against the set's captions; the synthetic ones also by
the distance of their centroid from the real images' (compare: the image-text gap) and the
centered cosine to the real image of the same scene.

    python bench/world_t2i.py                                 # the shipped world CLIP
    python bench/world_t2i.py --clip old=path/to/world_clip   # and another, side by side
"""

from __future__ import annotations

import argparse
import collections
import time
from dataclasses import replace

import torch

from pairfree.evaluate import markdown_table
from pairfree.world import parse_caption, world_preset
from pairfree.world.clip import builtin_checkpoint, load_world_clip_model
from pairfree.world.clip_training import evaluate_world_clip, held_out_set
from pairfree.world.synth import WorldTextToImage
from pairfree.world.truth import is_true

WORLDS = ["default", "shifted", "novel"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clip", action="append", default=[], metavar="NAME=DIR",
                        help="a world CLIP checkpoint to measure (repeatable); the shipped one "
                        "is always measured")  # fmt: skip
    parser.add_argument("--n", type=int, default=500, help="held-out scenes")
    parser.add_argument("--seed", type=int, default=0, help="run seed of the text-to-image images")
    return parser.parse_args()


def t2i_images(captions: list[str], seed: int) -> tuple[list, dict[str, float]]:
    """The default world's text-to-image drawings of ``captions`` and its measured mistake
    rates (share of images with each kind of mistake, and false to their prompt)."""
    t2i = WorldTextToImage(world_preset("default"))
    images, kinds, false = [], collections.Counter(), 0
    for caption in captions:
        drawing = t2i.draw(caption, seed)
        images.append(drawing.image)
        kinds.update({m.split()[0] for m in drawing.mistakes})
        false += not is_true(parse_caption(caption), drawing.scene)
    n = len(captions)
    rates = {
        "object dropped": kinds["dropped"] / n,
        "colors swapped or wrong": (kinds["swapped"] + kinds["drew"]) / n,
        "extra object": kinds["added"] / n,
        "false to its prompt": false / n,
    }
    return images, rates


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    clips = {"shipped": builtin_checkpoint()} | dict(c.split("=", 1) for c in args.clip)
    data = held_out_set(WORLDS, n=args.n)
    start = time.perf_counter()
    drawn, rates = t2i_images(data.captions, args.seed)
    seconds = time.perf_counter() - start
    rows = []
    for name, path in clips.items():
        model, _ = load_world_clip_model(path)
        measured = evaluate_world_clip(model, data)
        t2i = evaluate_world_clip(model, replace(data, synthetic_images=drawn))
        rows.append([
            name,
            f"{100 * measured['i2t_r1']:.1f}",
            f"{100 * measured['synthetic_i2t_r1']:.1f}",
            f"{100 * t2i['synthetic_i2t_r1']:.1f}",
            f"{measured['gap']:.2f}",
            f"{measured['real_synthetic_distance']:.2f}",
            f"{t2i['real_synthetic_distance']:.2f}",
            f"{measured['real_synthetic_centered_cosine']:.2f}",
            f"{t2i['real_synthetic_centered_cosine']:.2f}",
        ])  # fmt: skip
    header = ["world CLIP", "real R@1", "synthetic-style R@1", "T2I R@1", "image-text gap",
              "real-synthetic dist", "real-T2I dist", "centered cos synth", "centered cos T2I"]  # fmt: skip
    print(f"{args.n} held-out scenes of {', '.join(WORLDS)}; image -> caption R@1 in %")
    print(markdown_table(header, rows))
    print(f"\nthe world's text-to-image model on those {args.n} captions ({seconds:.1f} s):")
    print(markdown_table(["departure", "share of images"],
                         [[k, f"{100 * v:.1f} %"] for k, v in rates.items()]))  # fmt: skip


if __name__ == "__main__":
    main()
