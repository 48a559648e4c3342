"""Encode captions or images with a CLIP backend into a feature store (``pairfree encode``),
and a recipe's training corpus once for every run that reads it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pairfree.captioner.entities import class_texts, ensemble_mean
from pairfree.clip.base import ClipEncoder
from pairfree.data import Caption, load_image, randomize_gender
from pairfree.data.training_corpus import CorpusConfig, prepare_corpus
from pairfree.errors import BadInputError, PairfreeError
from pairfree.features import FeatureStore, Item, StoreInfo, write_store
from pairfree.job import Job


def caption_ids(captions: Sequence[Caption]) -> list[str]:
    """``<image_id>#<k>`` for the k-th caption of an image, else the caption's index."""
    seen: dict[str, int] = {}
    ids = []
    for i, cap in enumerate(captions):
        if cap.image_id is None:
            ids.append(str(i))
        else:
            k = seen.get(cap.image_id, 0)
            seen[cap.image_id] = k + 1
            ids.append(f"{cap.image_id}#{k}")
    return ids


def encode_captions(
    clip: ClipEncoder,
    captions: Sequence[Caption],
    out_dir: str | Path,
    *,
    clip_texts: Sequence[str] | None = None,
    normalize: bool = False,
    batch_size: int = 256,
    shard_size: int = 8192,
    dtype: str = "float32",
    job: Job | None = None,
) -> FeatureStore | None:
    """Text-tower embeddings of ``captions``; empty captions are skipped and reported.

    ``clip_texts`` is what CLIP reads for each caption where that differs from the caption
    (CapDec's gender rebalancing, CgT-GAN's captions without their final period); the store
    keeps the captions themselves as its texts, the training targets.
    """
    if clip_texts is None:
        clip_texts = [c.text for c in captions]
    if len(clip_texts) != len(captions):
        raise ValueError(f"{len(clip_texts)} CLIP texts for {len(captions)} captions")

    def caption_of(item: Item) -> Caption:
        return item.value[0] if isinstance(item.value, tuple) else item.value

    def check(item: Item) -> str:
        caption = caption_of(item)
        clip_text = item.value[1] if isinstance(item.value, tuple) else caption.text
        if not caption.text.strip() or not clip_text.strip():
            raise BadInputError(caption.source, "empty caption", line=caption.line, item_id=item.id)
        return clip_text

    # a caption CLIP reads as written is keyed as it always was, so existing stores stay valid
    values = [c if t == c.text else (c, t) for c, t in zip(captions, clip_texts, strict=True)]
    items = [Item(i, v) for i, v in zip(caption_ids(captions), values, strict=True)]
    info = StoreInfo(encoder=clip.name, kind="text", normalized=normalize, dtype=dtype)
    return write_store(
        out_dir,
        items,
        lambda texts: clip.encode_texts(texts, normalize=normalize, batch_size=len(texts)),
        info,
        load=check,
        row_text=lambda item: caption_of(item).text,
        shard_size=shard_size,
        batch_size=batch_size,
        job=job,
    )


def encode_entity_classes(
    clip: ClipEncoder,
    classes: Sequence[str],
    out_dir: str | Path,
    *,
    ensemble: bool,
    job: Job | None = None,
) -> FeatureStore | None:
    """The zero-shot entity classifier's store: each class name as its text, embedded as
    "A photo of a/an {class}." or, with ``ensemble``, as the renormalized mean of its prompt
    ensemble (see :mod:`pairfree.captioner.entities`)."""

    def encode(names: list[str]) -> torch.Tensor:
        return torch.stack([
            ensemble_mean(clip.encode_texts(class_texts(name, ensemble), normalize=True))
            for name in names
        ])  # fmt: skip

    items = [Item(str(i), name) for i, name in enumerate(classes)]
    info = StoreInfo(encoder=clip.name, kind="text", normalized=True)
    return write_store(out_dir, items, encode, info, shard_size=len(classes) or 1, job=job)


def encode_images(
    clip: ClipEncoder,
    images: Sequence[tuple[str, Path]],
    out_dir: str | Path,
    *,
    grid: bool = False,
    normalize: bool = False,
    batch_size: int = 64,
    shard_size: int = 2048,
    dtype: str | None = None,
    job: Job | None = None,
) -> FeatureStore | None:
    """Image-tower embeddings (or grid features) of ``(image_id, path)`` pairs.

    Unreadable images are skipped and reported; the rest are encoded. ``dtype`` None stores
    grid features as float16 (a grid is ~50x an embedding: SaCap's COCO grids are ~43 GB so,
    twice that in float32) and embeddings as float32.
    """
    items = [Item(image_id, Path(path)) for image_id, path in images]
    kind = "image_grid" if grid else "image"
    dtype = dtype or ("float16" if grid else "float32")
    info = StoreInfo(encoder=clip.name, kind=kind, normalized=normalize and not grid, dtype=dtype)

    def encode(batch):
        if grid:
            return clip.encode_image_grid(batch, batch_size=len(batch))
        return clip.encode_images(batch, normalize=normalize, batch_size=len(batch))

    return write_store(
        out_dir,
        items,
        encode,
        info,
        load=lambda item: load_image(item.value),
        shard_size=shard_size,
        batch_size=batch_size,
        job=job,
    )


def encode_corpus(
    clip: ClipEncoder,
    corpus: CorpusConfig,
    out_dir: Path,
    job: Job,
    *,
    edit: Callable[[str], str] | None = None,
    clip_text: Callable[[str], str] | None = None,
) -> FeatureStore:
    """The prepared corpus' CLIP text embeddings, encoded once (sharded over the processes)
    and reused by every later run that asks for the same captions and encoder.

    ``edit`` (if given) rewrites each caption as a recipe's own preprocessing does; CLIP reads
    each caption through ``clip_text`` (if given) and with its gendered words randomized
    (``corpus.gender``); the store keeps the (edited) captions, the targets.
    """
    captions = prepare_corpus(corpus, job.skip_log)
    if edit is not None:
        captions = [replace(c, text=edit(c.text)) for c in captions]
    if not captions:
        raise PairfreeError(
            f"{corpus.path}: the corpus has no usable sentences ({job.skip_log.summary()})"
        )
    texts = [clip_text(c.text) if clip_text else c.text for c in captions]
    texts = randomize_gender(texts, corpus.gender, corpus.gender_p, seed=corpus.seed)
    encode_captions(clip, captions, out_dir, clip_texts=texts, job=job)
    job.wait_for_everyone()  # the main process marks the store complete after the others return
    return FeatureStore(out_dir)


class OnlineGrids:
    """Grid features computed when a row is read instead of stored: a grid store's rows
    (``row(id)``, ``grids[row]``) for users without its disk (SaCap's COCO grids are ~43 GB
    in float16), at one image-tower pass per row read, every epoch."""

    def __init__(self, clip: ClipEncoder, images: Sequence[tuple[str, Path]]) -> None:
        self.clip = clip
        self.ids = [image_id for image_id, _ in images]
        self._files = [Path(path) for _, path in images]
        self._rows = {image_id: row for row, image_id in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    def row(self, image_id: str) -> int:
        try:
            return self._rows[image_id]
        except KeyError:
            raise PairfreeError(
                f"no image with id {image_id!r} to compute grid features of"
            ) from None

    def __getitem__(self, row: int) -> np.ndarray:
        return self.clip.encode_image_grid([load_image(self._files[row])])[0].numpy()
