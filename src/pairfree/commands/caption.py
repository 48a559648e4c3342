"""``pairfree caption``: a trained captioner + images -> COCO results JSON."""

from __future__ import annotations

import argparse
import json
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
    from dataclasses import asdict

    from tqdm.auto import tqdm

    from pairfree.data import image_sources, load_images
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
        settings = {
            "checkpoint": str(captioner.source.resolve()),
            "clip": captioner.clip.name,
            "conditioning": asdict(captioner.conditioning),
            "generation": asdict(captioner.generation),
        }

        # every process skips what any earlier run captioned, then takes its slice of the rest
        suffix = (
            f".partial.rank{job.process_index}.jsonl" if job.num_processes > 1 else ".partial.jsonl"
        )
        partial = args.out.with_name(args.out.name + suffix)
        done: dict[str, str] = {}
        for earlier in partial_files(args.out):
            done.update(read_partial(earlier, settings)[0])
        if done and job.is_main_process:
            print(f"resuming: {len(done)} images already captioned ({args.out}.partial*.jsonl)")
        todo = [(i, p) for i, p in pairs if i not in done][job.process_index :: job.num_processes]
        fresh = not partial.exists() or partial.stat().st_size == 0
        job.wait_for_everyone()  # every process has read the resume files before any grows
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with (
            open(partial, "a", encoding="utf-8") as log,
            tqdm(total=len(todo), desc="caption", unit="img", disable=not job.show_progress) as bar,
        ):
            for start in range(0, len(todo), args.batch_size):
                skipped = len(skip_log.items)
                ids, images = load_images(todo[start : start + args.batch_size], skip_log)
                texts = captioner.caption(images, batch_size=args.batch_size)
                if fresh:  # only now: settings that fail at once leave nothing to resume under
                    log.write(json.dumps({"settings": settings}) + "\n")
                    fresh = False
                for image_id, text in zip(ids, texts, strict=True):
                    log.write(json.dumps({"image_id": image_id, "caption": text}) + "\n")
                for error in skip_log.items[skipped:]:
                    log.write(json.dumps({"skipped": error.to_record()}) + "\n")
                log.flush()
                bar.update(len(todo[start : start + args.batch_size]))
        job.wait_for_everyone()
        if not job.is_main_process:
            return 0

        # the first process merges every process's captions (and what they skipped)
        skipped = [e.to_record() for e in skip_log.items]
        files = partial_files(args.out)
        for path in files:
            captions, their_skips = read_partial(path, settings)
            done.update(captions)
            skipped += [r for r in their_skips if r not in skipped]
        order = [i for i, _ in pairs if i in done]
        report_skips(skipped, args.out)
        if not order:
            for path in files:
                path.unlink()
            raise PairfreeError(
                f"nothing could be captioned: every one of {len(skipped)} inputs was skipped"
            )
        results = [{"image_id": int(i) if i.isdigit() else i, "caption": done[i]} for i in order]
        atomic_write_json(args.out, results)
        for path in files:
            path.unlink()
        if not args.quiet:
            width = max([len(str(i)) for i in order] + [8])
            print(f"{'image_id':<{width}}  caption")
            for i in order:
                print(f"{i:<{width}}  {done[i]}")
        print(f"captioned {len(results)} images -> {args.out}")
        return 0


def partial_files(out: Path) -> list[Path]:
    """The resume files of ``out``: one per process of earlier or current runs."""
    return sorted(out.parent.glob(out.name + ".partial*.jsonl"))


def read_partial(partial: Path, settings: dict) -> tuple[dict[str, str], list[dict]]:
    """The captions an interrupted run left (and the images it skipped), if it ran with the
    same ``settings``."""
    from pairfree.errors import PairfreeError

    lines = partial.read_text(encoding="utf-8").splitlines() if partial.exists() else []
    if not lines:
        return {}, []
    try:
        saved = json.loads(lines[0])["settings"] if lines else None
    except (json.JSONDecodeError, KeyError, TypeError):
        saved = None
    if saved != settings:
        changed = sorted(k for k in settings if not saved or saved.get(k) != settings[k])
        raise PairfreeError(
            f"{partial} holds captions made with other settings ({', '.join(changed) or 'unknown'}"
            "); rerun with the same ones to resume, or delete it to start over"
        )
    done: dict[str, str] = {}
    skipped: list[dict] = []
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            if "skipped" in rec:
                skipped.append(rec["skipped"])
            else:
                done[str(rec["image_id"])] = rec["caption"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a line cut by the interruption; that image is captioned again
    return done, skipped
