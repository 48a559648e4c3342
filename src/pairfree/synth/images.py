"""A synthetic image dataset: one image per (caption, variant) from a text-to-image backend.

Layout of the output folder::

    synthesis.json     what was asked: backend (its name and fingerprint), settings, run
                       seed, variants, prompts digest
    images/ID.png      the images, each written atomically
    shards/NNNNN.jsonl the records of each finished shard (the unit of resume)
    manifest.jsonl     every record: id, prompt, source caption id, variant, seed, backend,
                       nsfw, status ("ok" or why it was skipped), image, mistakes (the
                       image's known departures from its prompt, as the world's backend
                       reports them; null when the backend cannot tell, as for diffusers)
    dataset.jsonl      the usable pairs as a JSONL corpus ({"image_id", "image", "caption"}):
                       what ``pairfree encode --dataset`` and the recipes read

Images flagged NSFW (black, from Stable Diffusion's safety checker) are pairs of the dataset
with ``keep_nsfw``, as in SaCap's code (which draws, encodes and trains on every image it
made; ``pairfree synthesize images`` keeps them by default), and left out of it otherwise, as
ICSD's code does (its ``verify_nsfw_images.py`` lists the all-black images, which its
training skips; the ICSD recipe's default).

Work runs in shards over processes, resumably (:mod:`pairfree.synth.shards`); since every
image's seed is fixed by (run seed, prompt, variant), a shard made again gives the same images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pairfree.data import Caption, CleaningConfig, clean_caption, read_images
from pairfree.errors import PairfreeError
from pairfree.io import atomic_path
from pairfree.job import Job
from pairfree.synth.shards import backend_fingerprint, poor_yield, run_shards, write_jsonl
from pairfree.synth.text_to_image import TextToImage, image_seed


@dataclass(frozen=True)
class Prompt:
    id: str  # the image's id and file stem
    text: str
    source: str  # the caption it came from (its line, or image id and index)
    variant: int
    seed: int


@dataclass
class SynthesisSummary:
    made: int
    nsfw: int
    skipped: int
    out_dir: Path
    mistaken: int | None = None  # images with a known departure from their prompt
    nsfw_kept: bool = False  # whether the flagged images are pairs of the dataset
    reasons: list[str] = field(default_factory=list)  # why each prompt is not a pair

    @property
    def kept(self) -> int:
        """Pairs in the dataset."""
        return self.made - (0 if self.nsfw_kept else self.nsfw)

    def __str__(self) -> str:
        known = "" if self.mistaken is None else f", {self.mistaken} with a known mistake"
        where = "kept in" if self.nsfw_kept else "left out of"
        return (
            f"made {self.made} images ({self.nsfw} flagged NSFW, {where} the dataset"
            f"{known}), skipped {self.skipped} prompts -> {self.out_dir}"
        )

    def warning(self, max_reject_share: float = 0.5) -> str | None:
        """What to say when no pair was made or over ``max_reject_share`` of the prompts
        were left out (skipped, or flagged and dropped)."""
        return poor_yield("synthesize images", self.kept, self.reasons,
                          self.out_dir / "manifest.jsonl", max_reject_share)  # fmt: skip


def plan_prompts(captions: Sequence[Caption], *, variants: int, seed: int) -> list[Prompt]:
    """``variants`` images per caption, each with the seed its (prompt, variant) fixes."""
    if variants < 1:
        raise PairfreeError(f"variants must be at least 1, not {variants}")
    prompts = []
    for index, caption in enumerate(captions):
        source = f"{caption.source}:{caption.line}" if caption.line else str(index)
        for variant in range(variants):
            prompts.append(
                Prompt(
                    id=f"{index:08d}-{variant}",
                    text=caption.text,
                    source=source if caption.image_id is None else caption.image_id,
                    variant=variant,
                    seed=image_seed(seed, caption.text, variant),
                )
            )
    return prompts


def prompt_problem(backend: TextToImage, text: str) -> str | None:
    """Why ``text`` cannot be a prompt for ``backend`` (empty, longer than its text encoder
    reads), or None."""
    if not text.strip():
        return "empty prompt"
    tokenizer = getattr(getattr(backend, "pipeline", None), "tokenizer", None)
    if tokenizer is not None:
        length = len(tokenizer(text)["input_ids"])
        if length > tokenizer.model_max_length:
            return f"prompt of {length} tokens; the text encoder reads {tokenizer.model_max_length}"
    return None


def synthesize_images(
    backend: TextToImage,
    prompts: Sequence[Prompt],
    out_dir: str | Path,
    *,
    settings: dict,
    batch_size: int = 8,
    shard_size: int = 256,
    keep_nsfw: bool = False,
    job: Job | None = None,
) -> SynthesisSummary | None:
    """Make every prompt's image into ``out_dir`` (see the module docstring; ``keep_nsfw``:
    flagged images are pairs of the dataset too); returns the summary on the main process,
    None elsewhere."""
    out = Path(out_dir)

    def make(batch: list[Prompt]) -> list[dict]:
        records, usable = [], []
        for prompt in batch:
            problem = prompt_problem(backend, prompt.text)
            if problem:
                records.append(_record(prompt, backend, status=f"skipped: {problem}"))
            else:
                usable.append(prompt)
        made = backend.generate([p.text for p in usable], [p.seed for p in usable])
        for prompt, generated in zip(usable, made, strict=True):
            image = f"images/{prompt.id}.png"
            with atomic_path(out / image) as tmp:
                generated.image.save(tmp, format="PNG")
            records.append(_record(prompt, backend, nsfw=generated.nsfw, image=image,
                                   mistakes=generated.mistakes))  # fmt: skip
        return sorted(records, key=lambda r: r["id"])

    request = {"backend": backend.name, "fingerprint": backend_fingerprint(backend),
               "settings": settings, "shard_size": shard_size, "prompts": _digest(prompts)}  # fmt: skip
    records = run_shards(out, prompts, make, request=request, shard_size=shard_size,
                         batch_size=batch_size, job=job or Job(), desc="synthesize")  # fmt: skip
    if records is None:
        return None
    left_out = [r for r in records if r["status"] != "ok" or (r["nsfw"] and not keep_nsfw)]
    usable = [r for r in records if r["status"] == "ok" and (keep_nsfw or not r["nsfw"])]
    write_jsonl(out / "manifest.jsonl", records)
    pairs = [{"image_id": r["id"], "image": r["image"], "caption": r["prompt"]} for r in usable]
    write_jsonl(out / "dataset.jsonl", pairs)
    made = [r for r in records if r["status"] == "ok"]
    known = [r for r in made if r["mistakes"] is not None]
    return SynthesisSummary(
        made=len(made),
        nsfw=sum(r["nsfw"] for r in made),
        skipped=len(records) - len(made),
        out_dir=out,
        mistaken=sum(bool(r["mistakes"]) for r in known) if known else None,
        nsfw_kept=keep_nsfw,
        reasons=[
            r["status"].removeprefix("skipped: ") if r["status"] != "ok" else "flagged NSFW"
            for r in left_out
        ],  # fmt: skip
    )


def _digest(prompts: Sequence[Prompt]) -> str:
    h = hashlib.sha256()
    for p in prompts:
        h.update(json.dumps(asdict(p), sort_keys=True).encode())
    return h.hexdigest()


def _record(prompt: Prompt, backend: TextToImage, *, status: str = "ok", nsfw: bool = False,
            image: str | None = None, mistakes: Sequence[str] | None = None) -> dict:  # fmt: skip
    return {"id": prompt.id, "prompt": prompt.text, "source": prompt.source,
            "variant": prompt.variant, "seed": prompt.seed, "backend": backend.name,
            "nsfw": nsfw, "status": status, "image": image,
            "mistakes": None if mistakes is None else list(mistakes)}  # fmt: skip


def synthetic_images(folder: str, what: str, cleaning: CleaningConfig, job: Job) -> dict[str, Path]:
    """Prompt text (cleaned as the corpus is) -> image file of a synthetic dataset (its usable
    pairs, first variant)."""
    dataset = Path(folder) / "dataset.jsonl"
    if not dataset.is_file():
        raise PairfreeError(f"synthetic.{what}: {dataset} does not exist (run `pairfree "
                            "synthesize images` first)")  # fmt: skip
    images: dict[str, Path] = {}
    for item in read_images(dataset, skip_log=job.skip_log):
        if item.path is not None:
            images.setdefault(clean_caption(item.references[0], cleaning), item.path)
    return images
