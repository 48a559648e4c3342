"""``pairfree world``: make shapes worlds and train the world CLIP."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import at_least, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "world",
        help="make a shapes world (images + captions in the real datasets' formats), train its CLIP",
        description="The shapes world: a procedural benchmark whose every image's truth is known.",
    )
    world_sub = p.add_subparsers(dest="world_command", metavar="WORLD_COMMAND", required=True)

    make = world_sub.add_parser(
        "make",
        help="write a world: Karpathy-style JSON + PNG images + a text-only corpus",
        description=(
            "Write OUT/dataset_world.json (Karpathy format: train/val/test images with 5 "
            "references each, plus each image's scene), OUT/images/*.png, OUT/corpus.txt (a "
            "caption-only corpus sampled without rendering) and OUT/scenes.json. Every command "
            "that takes COCO takes these files. Deterministic by seed."
        ),
    )
    make.add_argument("out", type=Path, help="output folder")
    make.add_argument("--preset", default="default",
                      choices=["default", "shifted", "novel", "coco"],
                      help="default; shifted (cross-domain); novel (held-out words, NoCaps-like "
                      "domains); coco (cluttered COCO-like scenes, captions naming a salient few "
                      "of their objects)")  # fmt: skip
    make.add_argument("--train-images", type=int, default=2000, help="unpaired training images")
    make.add_argument("--val", type=int, default=200, help="validation images")
    make.add_argument("--test", type=int, default=200, help="test images")
    make.add_argument("--corpus", type=int, default=10000, help="text-only corpus captions")
    make.add_argument("--image-size", type=image_size, default=None,
                      help=f"pixels, 4 per grid cell to {MAX_IMAGE_SIZE} (default 64)")  # fmt: skip
    make.add_argument("--seed", type=int, default=0)
    make.set_defaults(func=run_make)
    lm = world_sub.add_parser(
        "lm",
        help="save an untrained world-vocabulary decoder (the world's GPT-2 / BERT / RoBERTa)",
        description=(
            "Save a small randomly initialized model with a word-level world tokenizer, loaded "
            "with from_pretrained like its real counterpart: --kind gpt2 (the text-only and "
            "SaCap decoders), bert (ICSD's decoder; cross-attention is added when loaded) or "
            "roberta (the GANs' discriminator encoder)."
        ),
    )
    lm.add_argument("out", type=Path, help="output folder")
    lm.add_argument("--kind", choices=["gpt2", "bert", "roberta"], default="gpt2")
    lm.add_argument("--seed", type=int, default=0)
    lm.set_defaults(func=run_lm)
    register_train_clip(world_sub)


def run_lm(args: argparse.Namespace) -> int:
    from pairfree.io import check_output
    from pairfree.locks import output_lock
    from pairfree.world.lm import build_world_bert, build_world_encoder, build_world_lm

    check_output(args.out, folder=True)
    with output_lock(args.out):
        build = {"gpt2": build_world_lm, "bert": build_world_bert, "roberta": build_world_encoder}
        print(f"untrained world {args.kind} -> {build[args.kind](args.out, seed=args.seed)}")
        return 0


MAX_IMAGE_SIZE = 1024  # beyond it a world image only costs memory (100000 pixels: 900 GB)


def image_size(text: str) -> int:
    """An argparse type: a world image's side in pixels, at least 4 per cell of its grid."""
    from pairfree.world.scene import GRID  # here: the world package is slow to import

    return at_least(4 * GRID, at_most=MAX_IMAGE_SIZE)(text)


def run_make(args: argparse.Namespace) -> int:
    from pairfree.io import check_output
    from pairfree.locks import output_lock
    from pairfree.world import make_world

    check_output(args.out, folder=True)
    with output_lock(args.out):
        paths = make_world(
            args.out,
            preset=args.preset,
            n_train_images=args.train_images,
            n_val=args.val,
            n_test=args.test,
            n_corpus=args.corpus,
            seed=args.seed,
            image_size=args.image_size,
        )
        print(f"world {args.preset!r} (seed {args.seed}) -> {paths.root}")
        print(f"  dataset: {paths.dataset}\n  corpus:  {paths.corpus}\n  images:  {paths.images}")
        return 0


def register_train_clip(world_sub) -> None:
    p = world_sub.add_parser(
        "train-clip",
        help="train a world CLIP (the shipped world:builtin was made by this command)",
        description=(
            "Train the world CLIP (small CNN image tower, order-sensitive text tower, symmetric "
            "InfoNCE with a learnable temperature and attribute-swap hard negatives) on scenes "
            "drawn on the fly, and report held-out image->text / text->image R@1 and R@5, the "
            "modality gap, the per-sample agreement and attribute-swap accuracy. Load it as "
            "--clip world:OUT."
        ),
    )
    p.add_argument("out", type=Path, help="checkpoint directory")
    p.add_argument("--worlds", default="default,shifted,novel", help="comma-separated presets")
    p.add_argument("--steps", type=positive_int, default=700)
    p.add_argument("--batch-size", type=at_least(2), default=256, help="contrastive: 2 or more")
    p.add_argument("--gap", type=float, default=0.8, help="target modality gap (real CLIP: ~0.8)")
    p.add_argument(
        "--modality-specific",
        type=float,
        default=0.4,
        help="weight (a sine, 0..1) of each modality's own embedding component: images and "
        "captions then disagree per sample, as in real CLIP (0: they agree up to the gap)",
    )
    p.add_argument(
        "--synthetic-fraction",
        type=float,
        default=0.2,
        help="share of training images drawn in the synthetic (text-to-image) style, so the "
        "CLIP reads both styles as real CLIP reads photos and Stable Diffusion images",
    )
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_train_clip)


def run_train_clip(args: argparse.Namespace) -> int:
    import json

    from pairfree.io import check_output
    from pairfree.locks import output_lock
    from pairfree.world.clip import WorldClipConfig
    from pairfree.world.clip_training import train_world_clip

    check_output(args.out, folder=True)
    with output_lock(args.out):
        metrics = train_world_clip(
            WorldClipConfig(gap=args.gap, modality_specific=args.modality_specific),
            args.worlds.split(","),
            steps=args.steps,
            batch_size=args.batch_size,
            seed=args.seed,
            synthetic_fraction=args.synthetic_fraction,
            out_dir=args.out,
        )
        print(json.dumps(metrics, indent=1))
        print(f"world CLIP -> {args.out} (use --clip world:{args.out})")
        return 0
