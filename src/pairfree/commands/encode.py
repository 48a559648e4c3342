"""``pairfree encode``: captions or images -> CLIP feature store."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import add_image_root, add_strict, positive_int, report_skips


def register(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="encode captions or images into a CLIP feature store",
        description=(
            "Encode a caption corpus (--captions) or images (--images files/folders/globs, or "
            "--dataset with --split) with a CLIP backend into a feature store directory. "
            "Resumable: rerunning the same command skips finished shards. Under "
            "`accelerate launch` each process encodes its own shards."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--captions", help="caption corpus (Karpathy/COCO/NoCaps JSON, CC TSV, txt, JSONL)"
    )
    src.add_argument("--images", nargs="+", help="image files, folders or globs")
    src.add_argument("--dataset", help="Karpathy/COCO/NoCaps JSON whose --split images to encode")
    p.add_argument(
        "--clip",
        required=True,
        help="CLIP spec, e.g. hf:openai/clip-vit-base-patch32, open_clip:RN50x4/openai",
    )
    p.add_argument("--out", required=True, type=Path, help="feature store directory")
    p.add_argument("--format", default="auto", help="corpus/dataset format (default: detect)")
    p.add_argument(
        "--split",
        default=None,
        help="split to read (default: train for captions, test for --dataset)",
    )
    add_image_root(p)
    p.add_argument(
        "--grid", action="store_true", help="store patch (grid) features instead of embeddings"
    )
    p.add_argument("--normalize", action="store_true", help="store L2-normalized embeddings")
    p.add_argument("--batch-size", type=positive_int, default=None, help="items per forward pass")
    p.add_argument("--shard-size", type=positive_int, default=None, help="items per shard file")
    p.add_argument(
        "--dtype",
        choices=["float16", "float32"],
        help="storage dtype (default: float16 for --grid, float32 otherwise)",
    )
    p.add_argument(
        "--precision",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="model compute dtype (GPU)",
    )
    add_strict(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from pairfree.clip import load_clip
    from pairfree.data import image_sources, read_captions
    from pairfree.encoding import encode_captions, encode_images
    from pairfree.io import check_output
    from pairfree.job import Job
    from pairfree.locks import output_lock

    check_output(args.out, inputs=[args.captions, args.dataset], folder=True)
    with output_lock(args.out):
        job = Job.create(strict=args.strict)
        common = dict(normalize=args.normalize, job=job)
        if args.dtype:
            common["dtype"] = args.dtype
        if args.batch_size:
            common["batch_size"] = args.batch_size
        if args.shard_size:
            common["shard_size"] = args.shard_size
        # read (and validate) the inputs before loading a model
        if args.captions:
            captions = read_captions(
                args.captions,
                format=args.format,
                split=args.split or "train",
                skip_log=job.skip_log,
            )
        else:
            pairs = image_sources(
                args.images or args.dataset,
                split=args.split or "test",
                image_root=args.image_root,
                allow_outside_root=args.allow_outside_root,
                format=args.format,
                skip_log=job.skip_log,
            )
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            args.precision
        ]
        clip = load_clip(args.clip, device=job.state.device, dtype=dtype)
        if args.captions:
            store = encode_captions(clip, captions, args.out, **common)
        else:
            store = encode_images(clip, pairs, args.out, grid=args.grid, **common)
        if store is not None:
            report_skips([e.to_record() for e in job.skip_log.items], args.out)
            print(f"wrote {len(store)} {store.kind} features of dim {store.dim} to {args.out}")
        return 0
