"""``pairfree offset``: measure the CLIP modality gap on a small paired set (CapDec option)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import add_device, add_image_root, add_strict, positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "offset",
        help="compute the modality offset (mean image - mean text embedding) from paired data",
        description=(
            "Encode the --split images of a paired dataset and their captions, and save the "
            "mean normalized image embedding minus the mean normalized text embedding "
            "(safetensors). CapDec can add it to text embeddings in training "
            "(offset.mode=train) or subtract it from image embeddings at inference "
            "(offset.mode=inference)."
        ),
    )
    p.add_argument("--dataset", required=True, help="paired Karpathy/COCO JSON")
    p.add_argument("--split", default="val")
    add_image_root(p)
    p.add_argument("--clip", required=True, help="CLIP spec (the one the captioner uses)")
    p.add_argument(
        "--max-images", type=positive_int, default=1000, help="pairs to use (default 1000)"
    )
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    add_device(p)
    add_strict(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pairfree.captioner import modality_offset, save_offset
    from pairfree.clip import load_clip
    from pairfree.data import dataset_images, load_images
    from pairfree.errors import PairfreeError, SkipLog
    from pairfree.io import check_output
    from pairfree.locks import output_lock

    check_output(args.out, inputs=[args.dataset])
    with output_lock(args.out):
        skip_log = SkipLog(strict=args.strict)
        items = dataset_images(
            args.dataset,
            split=args.split,
            image_root=args.image_root,
            allow_outside_root=args.allow_outside_root,
            skip_log=skip_log,
        )
        items = [it for it in items if it.references][: args.max_images]
        ids, images = load_images([(it.image_id, it.path) for it in items], skip_log)
        references = {it.image_id: it.references for it in items}
        texts = [text for image_id in ids for text in references[image_id]]
        if not images:
            raise PairfreeError(
                f"{args.dataset}: no readable paired images in split {args.split!r}"
            )
        clip = load_clip(args.clip, device=args.device)
        offset = modality_offset(clip.encode_images(images), clip.encode_texts(texts))
        save_offset(args.out, offset, clip=clip.name, pairs=len(images))
        if skip_log:
            print(skip_log.summary())
        print(
            f"modality gap |offset| = {offset.norm():.4f} from {len(images)} images, "
            f"{len(texts)} captions -> {args.out}"
        )
        return 0
