"""Captioning a set of image files: resumable, sliced across processes, bad images skipped.

What ``pairfree caption`` does, for any program: each process appends its captions batch by
batch to ``OUT.partial.jsonl`` (``OUT.partial.rankN.jsonl`` under a multi-process launch),
after a header with the captioner's settings. A rerun with the same settings skips every image
an earlier run captioned, in any of those files; other settings are refused rather than mixed.
The first process then merges them; the caller writes the result and removes the files
(:func:`remove_partial_files`), so an interruption anywhere loses at most one batch.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from pairfree.data import load_images
from pairfree.errors import PairfreeError, SkipLog
from pairfree.job import Job
from pairfree.pipeline import Captioner


@dataclass
class CaptionedImages:
    """The captions of a run (image id -> caption, in input order), the inputs it skipped
    (records with source, line, id and reason) and how many came from an earlier run."""

    captions: dict[str, str]
    skipped: list[dict[str, Any]] = field(default_factory=list)
    resumed: int = 0


def caption_settings(captioner: Captioner) -> dict[str, Any]:
    """What must match for a rerun to resume: checkpoint, CLIP, conditioning, decoding (as
    JSON reads them back: a tuple setting compares equal to the list the partial file holds)."""
    settings = {
        "checkpoint": str(captioner.source.resolve()),
        "clip": captioner.clip.name,
        "conditioning": asdict(captioner.conditioning),
        "generation": asdict(captioner.generation),
    }
    return json.loads(json.dumps(settings))


def caption_files(
    captioner: Captioner,
    images: Sequence[tuple[str, Path]],
    out: str | Path,
    *,
    batch_size: int = 32,
    job: Job | None = None,
    skip_log: SkipLog | None = None,
) -> CaptionedImages | None:
    """Caption ``(image_id, path)`` pairs, resuming from ``out``'s partial files; ``None`` on
    every process but the first, which gets everything (this run's and earlier runs')."""
    job = job or Job()
    skip_log = skip_log if skip_log is not None else job.skip_log
    out = Path(out)
    settings = caption_settings(captioner)
    # every process skips what any earlier run captioned, then takes its slice of the rest
    done: dict[str, str] = {}
    for earlier in partial_files(out):
        done.update(read_partial(earlier, settings)[0])
    resumed = len(done)
    todo = [(i, p) for i, p in images if i not in done][job.process_index :: job.num_processes]
    suffix = (
        f".partial.rank{job.process_index}.jsonl" if job.num_processes > 1 else ".partial.jsonl"
    )
    partial = out.with_name(out.name + suffix)
    fresh = not partial.exists() or partial.stat().st_size == 0
    job.wait_for_everyone()  # every process has read the resume files before any grows
    out.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(partial, "a", encoding="utf-8") as log,
        tqdm(total=len(todo), desc="caption", unit="img", disable=not job.show_progress) as bar,
    ):
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            already = len(skip_log.items)
            ids, pictures = load_images(batch, skip_log)
            texts = captioner.caption(pictures, batch_size=batch_size)
            if fresh:  # only now: settings that fail at once leave nothing to resume under
                log.write(json.dumps({"settings": settings}) + "\n")
                fresh = False
            for image_id, text in zip(ids, texts, strict=True):
                log.write(json.dumps({"image_id": image_id, "caption": text}) + "\n")
            for error in skip_log.items[already:]:
                log.write(json.dumps({"skipped": error.to_record()}) + "\n")
            log.flush()
            bar.update(len(batch))
    job.wait_for_everyone()
    if not job.is_main_process:
        return None

    # the first process merges every process's captions (and what they skipped)
    skipped = [e.to_record() for e in skip_log.items]
    for path in partial_files(out):
        captions, their_skips = read_partial(path, settings)
        done.update(captions)
        skipped += [r for r in their_skips if r not in skipped]
    ordered = {i: done[i] for i, _ in images if i in done}
    return CaptionedImages(ordered, skipped, resumed)


def partial_files(out: str | Path) -> list[Path]:
    """The resume files of ``out``: one per process of earlier or current runs."""
    out = Path(out)
    return sorted(out.parent.glob(out.name + ".partial*.jsonl"))


def remove_partial_files(out: str | Path) -> None:
    """Once ``out`` is written, its resume files are spent."""
    for path in partial_files(out):
        path.unlink(missing_ok=True)


def read_partial(partial: Path, settings: dict) -> tuple[dict[str, str], list[dict]]:
    """The captions an interrupted run left (and the images it skipped), if it ran with the
    same ``settings``."""
    lines = partial.read_text(encoding="utf-8").splitlines() if partial.exists() else []
    if not lines:
        return {}, []
    try:
        saved = json.loads(lines[0])["settings"]
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
