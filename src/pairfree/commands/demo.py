"""``pairfree demo``: the shapes-world demo (the README's first command)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from pairfree.commands.common import positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="train text-only captioners in the shapes world and print a results table",
        description=(
            "Make a shapes world, encode its caption corpus with the shipped world CLIP, train "
            "CapDec on text only (noise variance 0.016) and the no-noise baseline, caption "
            "held-out images, and print BLEU-4/METEOR/ROUGE-L/CIDEr-D, CLIPScore and the "
            "world's truth metrics (object precision/recall, exact scene, attribute accuracy). "
            "Writes OUT/results.json and OUT/report.html. About 5 minutes on 2 CPU cores. "
            "--full adds the noise-variance sweep (0.001, 0.004, 0.064) and the unpaired "
            "recipes (CgT-GAN, SCST-GAN, each beside its own text-only initialization) on the "
            "world's unpaired training images: about 30 minutes."
        ),
    )
    p.add_argument(
        "--out", type=Path, default=Path("runs/demo"), help="output folder (default runs/demo)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive_int, default=None, help="training steps per method")
    p.add_argument("--corpus", type=positive_int, default=None, help="corpus captions")
    p.add_argument("--test-images", type=positive_int, default=None, help="held-out images")
    p.add_argument(
        "--full", action="store_true", help="add the noise sweep and the GAN recipes (~30 min)"
    )
    p.add_argument("--gan-steps", type=positive_int, default=None, help="GAN-phase steps (--full)")
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=min(2, os.cpu_count() or 1),
        help="text-only runs trained at once in separate processes (default: 2, or 1 on one core)",
    )
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time

    from pairfree.demo import DEMO_METHODS, FULL_METHODS, DemoConfig, run_demo
    from pairfree.io import check_output
    from pairfree.locks import output_lock

    check_output(args.out, folder=True)
    with output_lock(args.out):
        cfg = DemoConfig(out=str(args.out), seed=args.seed)
        if args.steps:
            cfg.steps = args.steps
        if args.corpus:
            cfg.n_corpus = args.corpus
        if args.test_images:
            cfg.n_test = args.test_images
        if args.gan_steps:
            cfg.gan_steps = args.gan_steps
        methods = DEMO_METHODS
        if args.full:
            cfg, methods = cfg.with_images(), FULL_METHODS
        start = time.time()
        table, report = run_demo(cfg, methods, progress=not args.no_progress, jobs=args.jobs)
        print(table)
        print(f"\nreport: {report}  ({time.time() - start:.0f} s)")
        return 0
