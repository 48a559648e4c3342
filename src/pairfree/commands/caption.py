"""``pairfree caption``: a trained captioner + images -> COCO results JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import (
    add_device,
    add_image_root,
    add_strict,
    positive_int,
    report_skips,
)


def register(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images with a trained captioner",
        description=(
            "Caption image files, folders or globs (or the --split images of a --dataset JSON) "
            "with a captioner checkpoint. Writes COCO results JSON [{image_id, caption}] "
            "and prints a table. Bad images are skipped and listed in OUT.skipped.jsonl. "
            "An interrupted run resumes from OUT.partial.jsonl. Under `accelerate launch` (or "
            "torchrun) each process captions its slice of the images on its own device and "
            "resumes from its own OUT.partial.rankN.jsonl; the first one writes OUT."
        ),
    )
    p.add_argument(
        "checkpoint",
        type=Path,
        help="captioner checkpoint directory, training run folder (its best/, else last/) or "
        "Hugging Face Hub repo id",
    )
    p.add_argument("images", nargs="*", help="image files, folders or globs")
    p.add_argument("--dataset", help="Karpathy/COCO/NoCaps JSON to caption the --split images of")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    add_image_root(p)
    p.add_argument(
        "--out",
        type=Path,
        default=Path("captions.json"),
        help="output JSON (default: captions.json)",
    )
    p.add_argument("--clip", default=None, help="override the CLIP spec recorded in the checkpoint")
    p.add_argument(
        "--project-to", type=Path, default=None, help="text feature store: DeCap projection memory"
    )
    p.add_argument("--tau", type=float, default=0.01, help="projection temperature (default 0.01)")
    p.add_argument(
        "--beams", type=positive_int, default=None, help="beam size (default: the checkpoint's)"
    )
    p.add_argument("--max-tokens", type=positive_int, default=None, help="maximum new tokens")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="precision of the decoder and CLIP (half precision is for GPUs)",
    )
    add_device(p)
    add_strict(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pairfree.captioning import caption_files, remove_partial_files
    from pairfree.data import image_sources
    from pairfree.errors import PairfreeError, SkipLog
    from pairfree.io import atomic_write_json, check_output
    from pairfree.job import Job
    from pairfree.locks import output_lock
    from pairfree.pipeline import Captioner

    if not args.images and not args.dataset:
        raise PairfreeError("give image files/folders/globs or --dataset")
    check_output(args.out, inputs=[args.dataset, *args.images])
    with output_lock(args.out):
        job = Job.create(strict=args.strict, progress=not args.quiet)
        skip_log = SkipLog(strict=args.strict)
        pairs = image_sources(
            args.dataset or args.images,
            split=args.split,
            image_root=args.image_root,
            allow_outside_root=args.allow_outside_root,
            skip_log=skip_log,
        )
        if not pairs and not skip_log.items:
            where = f"{args.dataset} (split {args.split})" if args.dataset else "the inputs given"
            raise PairfreeError(f"no images to caption in {where}")
        overrides = {}
        if args.beams is not None:
            overrides["num_beams"] = args.beams
        if args.max_tokens is not None:
            overrides["max_new_tokens"] = args.max_tokens
        captioner = Captioner.from_pretrained(
            args.checkpoint,
            clip=args.clip,
            project_to=args.project_to,
            tau=args.tau,
            device=args.device if job.num_processes == 1 else job.state.device,
            dtype=args.dtype,
            **overrides,
        )
        run = caption_files(
            captioner, pairs, args.out, batch_size=args.batch_size, job=job, skip_log=skip_log
        )
        if run is None:  # not the first process: it merged nothing
            return 0
        if run.resumed:
            print(f"resuming: {run.resumed} images already captioned by an earlier run")
        report_skips(run.skipped, args.out)
        if not run.captions:
            remove_partial_files(args.out)
            raise PairfreeError(
                f"nothing could be captioned: every one of {len(run.skipped)} inputs was skipped"
            )
        results = [
            {"image_id": int(i) if i.isdigit() else i, "caption": text}
            for i, text in run.captions.items()
        ]
        atomic_write_json(args.out, results)
        remove_partial_files(args.out)
        if not args.quiet:
            width = max([len(str(i)) for i in run.captions] + [8])
            print(f"{'image_id':<{width}}  caption")
            for i, text in run.captions.items():
                print(f"{i:<{width}}  {text}")
        print(f"captioned {len(results)} images -> {args.out}")
        return 0
