"""SynC (Kim et al., ACM MM 2025): re-assign each caption of a synthetic dataset to the
synthetic image that fits it best, then keep the best-fitting 90 % of the pairs.

A text-to-image model often misdraws its prompt; another caption's image may show this
caption better. For every caption C_i of a dataset of (caption, its synthetic image) pairs:

1. **candidates**: the K (15) images nearest to C_i by a vision-language model's text-to-image
   cosine (SynC's default: SigLIP2 ViT-B-16-256), its own image among them if it ranks;
2. **cycle score** of a candidate I: I retrieves its K_r (2) nearest captions by
   image-to-text cosine, and f(I, C_i) = the best sentence-embedding cosine between one of
   them and C_i (a paraphrase MiniLM), so an image that retrieves C_i, or a caption saying
   the same, scores near 1;
3. **assignment**: C_i takes its candidate of highest f (ties: the candidate the text-to-image
   retrieval ranked first); an image may serve several captions, and some serve none;
4. **filtering**: the pairs are ranked by f, highest first (ties keep the dataset's order),
   and the first 90 % are kept.

Nothing is random: the same inputs give the same assignment. The output is a synthetic
dataset of its own (``dataset.jsonl``, one record per kept pair, the assigned image hard-linked
or copied into ``images/``), so every recipe that reads one (SaCap's ``synthetic.images``,
PCM-Net's ``images``) trains on it unchanged, and ``reassignment.jsonl`` says for every
caption which image it had, which it got, its score and whether it was kept. Those recipes
also run it as a stage of their own (``reassign:``, :func:`training_images`).

Where pairfree differs on purpose: the scores are float32 (the original rounds them to
float16, which ties many near 1); the search is pairfree's exact (or faiss) cosine search,
chunked, where the original fills an [N, K, K_r, d] array at once (25 GB for COCO).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import Caption, read_images
from pairfree.encoding import encode_captions, encode_images
from pairfree.errors import PairfreeError
from pairfree.features import FeatureStore, store_key
from pairfree.io import atomic_path, atomic_write_json, atomic_write_text
from pairfree.job import Job
from pairfree.retrieval import BACKENDS, nearest_rows
from pairfree.synth.sentences import SentenceEncoder, load_sentence_encoder, sentence_backend


@dataclass
class ReassignConfig:
    clip: str = "open_clip:hf-hub:timm/ViT-B-16-SigLIP2-256"  # retrieves, both ways
    sentences: str = "hf:sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2"
    candidates: int = 15  # K: images each caption considers
    back: int = 2  # K_r: captions each candidate retrieves back
    keep: float = 0.9  # the share of pairs kept, best cycle scores first
    index: str = "exact"  # "exact" | "faiss"

    def __post_init__(self) -> None:
        if self.candidates < 1 or self.back < 1:
            raise PairfreeError(f"candidates and back must be >= 1, not {self.candidates}, "
                                f"{self.back}")  # fmt: skip
        if not 0 < self.keep <= 1:
            raise PairfreeError(f"keep must be in (0, 1], not {self.keep}")
        if self.index not in BACKENDS:
            raise PairfreeError(f"index must be one of {BACKENDS}, not {self.index!r}")
        sentence_backend(self.sentences)  # a bad spec fails before any model loads


@dataclass
class Reassignment:
    assigned: list[int]  # each caption's image row
    scores: list[float]  # its cycle score
    kept: list[int]  # the captions kept, best score first


def cycle_scores(
    text: torch.Tensor,
    images: torch.Tensor,
    sentences: torch.Tensor,
    *,
    candidates: int,
    back: int,
    backend: str = "exact",
    chunk: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For captions (``text`` [N, d] and unit ``sentences`` [N, s]) over images [M, d]: [N]
    each caption's best candidate image row and [N] its cycle score."""
    t2i = nearest_rows(text, images, min(candidates, len(images)), backend=backend)  # [N, K]
    i2t = nearest_rows(images, text, min(back, len(text)), backend=backend)  # [M, K_r]
    best, scores = [], []
    for start in range(0, len(text), chunk):
        rows = t2i[start : start + chunk]
        back_captions = sentences[i2t[rows]]  # [c, K, K_r, s]
        sims = torch.einsum("ckrs,cs->ckr", back_captions, sentences[start : start + chunk])
        per_candidate = sims.max(dim=-1).values  # [c, K]
        score, pick = per_candidate.max(dim=-1)  # the first maximum: the best-ranked candidate
        best.append(rows.gather(1, pick[:, None]).squeeze(1))
        scores.append(score)
    return torch.cat(best), torch.cat(scores)


def reassign(
    text: torch.Tensor, images: torch.Tensor, sentences: torch.Tensor, cfg: ReassignConfig
) -> Reassignment:
    """SynC's assignment and filtering of captions to images (see the module docstring)."""
    if len(text) == 0 or len(images) == 0:
        raise PairfreeError("re-assignment needs captions and images")
    assigned, scores = cycle_scores(text, images, sentences, candidates=cfg.candidates,
                                    back=cfg.back, backend=cfg.index)  # fmt: skip
    order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))  # stable
    kept = order[: max(1, int(cfg.keep * len(order)))]
    return Reassignment(assigned.tolist(), scores.tolist(), kept)


def reassign_dataset(
    source: str | Path,
    out: str | Path,
    cfg: ReassignConfig,
    clip: ClipEncoder,
    sentence_encoder: SentenceEncoder,
    *,
    job: Job,
) -> Reassignment:
    """Re-assign the captions of the synthetic dataset in ``source`` (``dataset.jsonl``) and
    write the result as a synthetic dataset in ``out`` (see the module docstring). The
    encodings are cached in ``out/features``, so a run stopped midway resumes there."""
    source, out = Path(source), Path(out)
    dataset = source / "dataset.jsonl"
    if not dataset.is_file():
        raise PairfreeError(f"{dataset} does not exist (run `pairfree synthesize images` first)")
    items = [it for it in read_images(dataset, skip_log=job.skip_log) if it.path is not None]
    captions = list(dict.fromkeys(it.references[0] for it in items if it.references))
    if not captions:
        raise PairfreeError(f"{dataset}: no captioned images")
    # one store per (CLIP, images) and (CLIP, captions): another source gets stores of its own
    features = out / "features"
    pairs = [(it.image_id, it.path) for it in items]
    images_dir = features / f"images-{store_key([clip.name, *(f'{i} {p}' for i, p in pairs)])}"
    captions_dir = features / f"captions-{store_key([clip.name, *captions])}"
    encode_images(clip, pairs, images_dir, job=job)
    encode_captions(clip, [Caption(t, None, str(dataset), None) for t in captions], captions_dir,
                    job=job)  # fmt: skip
    job.wait_for_everyone()
    image_store = FeatureStore(images_dir)
    readable = [it for it in items if it.image_id in image_store]
    images = image_store.tensor()[[image_store.row(it.image_id) for it in readable]]
    text_store = FeatureStore(captions_dir)
    text = text_store.tensor()[[text_store.text_row(t) for t in captions]]
    sentences = sentence_embeddings(sentence_encoder, captions, features)
    result = reassign(text, images, sentences, cfg)
    if job.is_main_process:
        write_reassigned(out, captions, readable, result, cfg, source=source_stamp(dataset))
    job.wait_for_everyone()
    return result


def training_images(
    images: str,
    cfg: ReassignConfig | None,
    out: str | Path,
    *,
    job: Job,
    clip: ClipEncoder | None = None,
    clip_spec: str | None = None,
) -> str:
    """The synthetic dataset a recipe trains on: ``images`` itself, or with ``cfg`` set, SynC's
    re-assignment of it, made in ``out`` unless ``out/reassign.json`` says it was made from
    the same dataset (its ``dataset.jsonl``, byte for byte) with the same settings. ``clip``
    is the recipe's loaded CLIP (``clip_spec``), used when it is the one ``cfg`` names."""
    if cfg is None:
        return images
    out = Path(out)
    done = out / "reassign.json"
    source = Path(images) / "dataset.jsonl"
    if not source.is_file():
        raise PairfreeError(f"{source} does not exist (run `pairfree synthesize images` first)")
    if done.is_file():
        made = json.loads(done.read_text())
        if made.get("settings") == asdict(cfg) and made.get("source") == source_stamp(source):
            return str(out)
    device = job.state.device
    reuse = clip is not None and clip_spec == cfg.clip
    encoder = clip if reuse else load_clip(cfg.clip, device=device)
    sentences = load_sentence_encoder(cfg.sentences, device=device)
    reassign_dataset(images, out, cfg, encoder, sentences, job=job)
    return str(out)


def source_stamp(dataset: Path) -> dict[str, str]:
    """Which synthetic dataset a re-assignment was made from: its folder and content."""
    content = hashlib.sha256(dataset.read_bytes()).hexdigest()[:16]
    return {"dataset": str(dataset.resolve()), "sha256": content}


def sentence_embeddings(
    encoder: SentenceEncoder, captions: Sequence[str], features: Path
) -> torch.Tensor:
    """The captions' sentence embeddings, cached by encoder and captions."""
    path = features / f"sentences-{store_key([encoder.name, *captions], 16)}.safetensors"
    if path.is_file():
        return load_file(str(path))["sentences"]
    embeds = encoder.encode(list(captions)).float().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file({"sentences": embeds}, str(tmp))
    return embeds


def write_reassigned(
    out: Path,
    captions: list[str],
    images: list,
    result: Reassignment,
    cfg: ReassignConfig,
    *,
    source: dict[str, str],
) -> None:
    """``out/images`` (the assigned images, linked), ``dataset.jsonl`` (the kept pairs, in
    the source's caption order), ``reassignment.jsonl`` (every caption) and
    ``reassign.json`` (settings and counts), each written atomically."""
    own = {}
    for it in images:
        own.setdefault(it.references[0], it.image_id)
    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    kept = set(result.kept)
    names = {}
    for row in sorted({result.assigned[i] for i in kept}):
        path = images[row].path
        names[row] = f"images/{images[row].image_id}{path.suffix}"
        target = out / names[row]
        if not (target.exists() and os.path.samefile(path, target)):  # new, or another source's
            link_or_copy(path, target)
    records = [{"image_id": f"{i:09d}", "image": names[result.assigned[i]], "caption": c}
               for i, c in enumerate(captions) if i in kept]  # fmt: skip
    every = [{"caption": c, "own": own.get(c), "assigned": images[result.assigned[i]].image_id,
              "score": round(result.scores[i], 6), "kept": i in kept}
             for i, c in enumerate(captions)]  # fmt: skip
    for name, rows in (("dataset.jsonl", records), ("reassignment.jsonl", every)):
        atomic_write_text(out / name, "".join(json.dumps(r) + "\n" for r in rows))
    used = {Path(name).name for name in names.values()}
    for stale in folder.iterdir():  # an earlier re-assignment's images
        if stale.name not in used and not stale.name.startswith("."):
            stale.unlink()
    moved = sum(r["assigned"] != r["own"] for r in every)
    atomic_write_json(out / "reassign.json", {
        "settings": asdict(cfg), "source": source, "captions": len(captions), "images": len(images),
        "kept": len(kept), "reassigned": moved,
        "images_used": len({result.assigned[i] for i in kept}),
    })  # fmt: skip


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` as a hard link to ``source`` (a copy across file systems), made under a
    temporary name and renamed into place."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # another file system, or no hard links
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)
