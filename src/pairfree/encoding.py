"""Encode captions or images with a CLIP backend into a feature store (``pairfree encode``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from pairfree.clip.base import ClipEncoder
from pairfree.data import Caption, load_image
from pairfree.errors import BadInputError
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
    normalize: bool = False,
    batch_size: int = 256,
    shard_size: int = 8192,
    dtype: str = "float32",
    job: Job | None = None,
) -> FeatureStore | None:
    """Text-tower embeddings of ``captions``; empty captions are skipped and reported."""

    def check(item: Item[Caption]) -> str:
        if not item.value.text.strip():
            raise BadInputError(
                item.value.source, "empty caption", line=item.value.line, item_id=item.id
            )
        return item.value.text

    items = [Item(i, c) for i, c in zip(caption_ids(captions), captions, strict=True)]
    info = StoreInfo(encoder=clip.name, kind="text", normalized=normalize, dtype=dtype)
    return write_store(
        out_dir,
        items,
        lambda texts: clip.encode_texts(texts, normalize=normalize, batch_size=len(texts)),
        info,
        load=check,
        shard_size=shard_size,
        batch_size=batch_size,
        job=job,
    )


def encode_images(
    clip: ClipEncoder,
    images: Sequence[tuple[str, Path]],
    out_dir: str | Path,
    *,
    grid: bool = False,
    normalize: bool = False,
    batch_size: int = 64,
    shard_size: int = 2048,
    dtype: str = "float32",
    job: Job | None = None,
) -> FeatureStore | None:
    """Image-tower embeddings (or grid features) of ``(image_id, path)`` pairs.

    Unreadable images are skipped and reported; the rest are encoded.
    """
    items = [Item(image_id, Path(path)) for image_id, path in images]
    kind = "image_grid" if grid else "image"
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
