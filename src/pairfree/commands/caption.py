"""``pairfree caption``: a trained captioner + images -> COCO results JSON."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pairfree.commands.common import add_device, add_strict, report_skips


def register(sub) -> None:
    p = sub.add_parser(
        "caption",
        help="caption images with a trained captioner",
        description=(
            "Caption image files, folders or globs (or the --split images of a --dataset JSON) "
            "with a captioner checkpoint. Writes COCO results JSON [{image_id, caption}] "
            "and prints a table. Bad images are skipped and listed in OUT.skipped.jsonl. "
            "An interrupted run resumes from OUT.partial.jsonl."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="captioner checkpoint directory")
    p.add_argument("images", nargs="*", help="image files, folders or globs")
    p.add_argument("--dataset", help="Karpathy/COCO/NoCaps JSON to caption the --split images of")
    p.add_argument("--split", default="test", help="dataset split (default: test)")
    p.add_argument(
        "--image-root", default=None, help="folder the dataset's file names are relative to"
    )
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
    p.add_argument("--beams", type=int, default=None, help="beam size (default: the checkpoint's)")
    p.add_argument("--max-tokens", type=int, default=None, help="maximum new tokens")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--quiet", action="store_true", help="do not print the caption table")
    add_device(p)
    add_strict(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from pairfree.data import image_sources, load_images
    from pairfree.errors import PairfreeError, SkipLog
    from pairfree.io import atomic_write_json
    from pairfree.pipeline import Captioner

    if not args.images and not args.dataset:
        raise PairfreeError("give image files/folders/globs or --dataset")
    skip_log = SkipLog(strict=args.strict)
    pairs = image_sources(
        args.dataset or args.images,
        split=args.split,
        image_root=args.image_root,
        skip_log=skip_log,
    )
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
        device=args.device,
        **overrides,
    )

    partial = args.out.with_name(args.out.name + ".partial.jsonl")
    done: dict[str, str] = {}
    if partial.exists():
        for line in partial.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                done[str(rec["image_id"])] = rec["caption"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line cut by the interruption; that image is captioned again
        print(f"resuming: {len(done)} images already captioned in {partial}")
    todo = [(i, p) for i, p in pairs if i not in done]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(partial, "a", encoding="utf-8") as log,
        tqdm(total=len(todo), desc="caption", unit="img") as bar,
    ):
        for start in range(0, len(todo), args.batch_size):
            ids, images = load_images(todo[start : start + args.batch_size], skip_log)
            for image_id, text in zip(
                ids, captioner.caption(images, batch_size=args.batch_size), strict=True
            ):
                done[image_id] = text
                log.write(json.dumps({"image_id": image_id, "caption": text}) + "\n")
            log.flush()
            bar.update(len(todo[start : start + args.batch_size]))
    order = [i for i, _ in pairs if i in done]
    results = [{"image_id": int(i) if i.isdigit() else i, "caption": done[i]} for i in order]
    atomic_write_json(args.out, results)
    partial.unlink()
    if not args.quiet:
        width = max([len(str(i)) for i in order] + [8])
        print(f"{'image_id':<{width}}  caption")
        for i in order:
            print(f"{i:<{width}}  {done[i]}")
    report_skips([e.to_record() for e in skip_log.items], args.out)
    print(f"captioned {len(results)} images -> {args.out}")
    return 0
