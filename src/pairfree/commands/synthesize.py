"""``pairfree synthesize``: synthetic training data from a caption corpus."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import add_device, add_strict, positive_int, report_skips


def register(sub) -> None:
    p = sub.add_parser(
        "synthesize",
        help="make synthetic training data from a caption corpus (text-to-image)",
        description="Synthetic data for the synthetic-image recipes (SaCap, ICSD).",
    )
    kinds = p.add_subparsers(dest="synthesize_command", metavar="KIND", required=True)
    images = kinds.add_parser(
        "images",
        help="one image per caption (and variant) from a text-to-image backend",
        description=(
            "Draw an image for every caption of CORPUS (any corpus format) with a text-to-image "
            "backend: diffusers:<hub id or folder> (Stable Diffusion; SaCap used SD 1.5 with "
            "its default scheduler, ICSD SD 1.4 with DPMSolverMultistepScheduler, both 20 "
            "steps) or world:<preset> (the shapes world). Writes OUT/images/*.png, "
            "OUT/manifest.jsonl (every prompt: seed, NSFW flag, status) and OUT/dataset.jsonl "
            "(the usable pairs; `pairfree encode --dataset OUT/dataset.jsonl` reads it). Each "
            "image's seed is fixed by (--seed, caption, variant). Resumable: rerun the same "
            "command; under torchrun/accelerate launch each process makes its own shards."
        ),
    )
    images.add_argument("corpus", type=Path, help="caption corpus (Karpathy/COCO JSON, txt, ...)")
    images.add_argument("--backend", required=True, help="diffusers:<model> or world:<preset>")
    images.add_argument("--out", type=Path, required=True, help="output folder")
    images.add_argument("--format", default="auto", help="corpus format (default: detect)")
    images.add_argument("--split", default="train", help="split of a Karpathy file")
    images.add_argument("--variants", type=positive_int, default=1, help="images per caption")
    images.add_argument("--seed", type=int, default=0, help="run seed (default 0)")
    images.add_argument("--steps", type=positive_int, default=20, help="denoising steps")
    images.add_argument("--guidance-scale", type=float, default=7.5)
    images.add_argument("--negative-prompt", default=None)
    images.add_argument("--scheduler", default=None, help="diffusers scheduler class name")
    images.add_argument("--height", type=positive_int, default=None)
    images.add_argument("--width", type=positive_int, default=None)
    images.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    images.add_argument("--batch-size", type=positive_int, default=8)
    images.add_argument("--shard-size", type=positive_int, default=256, help="prompts per shard")
    images.add_argument(
        "--keep-nsfw", action="store_true", help="keep images flagged NSFW in dataset.jsonl"
    )
    images.add_argument("--no-progress", action="store_true")
    add_device(images)
    add_strict(images)
    images.set_defaults(func=run_images)


def run_images(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from pairfree.data import read_captions
    from pairfree.io import check_output
    from pairfree.job import Job
    from pairfree.synth.images import plan_prompts, synthesize_images
    from pairfree.synth.text_to_image import DiffusionSettings, load_text_to_image

    check_output(args.out, inputs=[args.corpus], folder=True)
    job = Job.create(strict=args.strict, progress=not args.no_progress)
    captions = read_captions(
        args.corpus, format=args.format, split=args.split, skip_log=job.skip_log
    )
    prompts = plan_prompts(captions, variants=args.variants, seed=args.seed)
    settings = DiffusionSettings(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        scheduler=args.scheduler,
        height=args.height,
        width=args.width,
        dtype=args.dtype,
    )
    device = args.device if job.num_processes == 1 else job.state.device
    backend = load_text_to_image(args.backend, settings, device=device)
    summary = synthesize_images(
        backend,
        prompts,
        args.out,
        settings={**asdict(settings), "seed": args.seed, "variants": args.variants},
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        keep_nsfw=args.keep_nsfw,
        job=job,
    )
    if summary is not None:
        report_skips([e.to_record() for e in job.skip_log.items], args.out)
        print(summary)
    return 0
