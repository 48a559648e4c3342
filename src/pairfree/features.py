"""The on-disk feature store: CLIP embeddings computed once, read memory-mapped by every recipe.

Layout of a store directory::

    manifest.json          encoder, kind, dim, dtype, normalized, shard plan, complete flag
    shard-00000.npy        [n, dim] (or [n, L, width] for grid features), memory-mappable
    shard-00000.json       ids (and texts for text stores) of the rows, items skipped there

A shard counts as done when its ``.npy`` exists; both files are written atomically, the
``.json`` first, so a killed run resumes at the first missing shard and never trusts half a
file. Under ``accelerate launch`` process r writes shards r, r + world, ... and rank 0 marks
the store complete once every shard exists (the processes come in one :class:`Job`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from pairfree.errors import BadInputError, PairfreeError
from pairfree.io import atomic_path, atomic_write_json
from pairfree.job import Job

FORMAT = "pairfree-features/1"
T = TypeVar("T")


@dataclass(frozen=True)
class StoreInfo:
    """What a store holds; two runs may share a store only if these agree."""

    encoder: str
    kind: str  # "text" | "image" | "image_grid"
    normalized: bool
    dtype: str = "float32"


@dataclass(frozen=True)
class Item(Generic[T]):
    id: str
    value: T  # a caption (text stores) or an image path (image stores)


def store_key(lines: Iterable[str], size: int = 12) -> str:
    """A short name for a store by what it holds (its captions, its files, its settings), so
    that runs on other data sharing one feature cache get stores of their own."""
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:size]


def _plan_digest(items: Sequence[Item], info: StoreInfo, shard_size: int) -> str:
    """Identifies what a store holds, so a changed corpus never reuses stale shards."""
    h = hashlib.sha256(json.dumps([info.__dict__, shard_size]).encode())
    for it in items:
        h.update(f"{it.id}\0{it.value!r}\0".encode())
    return h.hexdigest()


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def write_store(
    out_dir: str | Path,
    items: Sequence[Item[T]],
    encode: Callable[[list[Any]], torch.Tensor],
    info: StoreInfo,
    *,
    load: Callable[[Item[T]], Any] | None = None,
    row_text: Callable[[Item[T]], str] | None = None,
    shard_size: int = 4096,
    batch_size: int = 256,
    job: Job | None = None,
) -> FeatureStore | None:
    """Encode ``items`` into a store at ``out_dir``, resuming whatever an earlier run finished.

    Items are loaded and encoded ``batch_size`` at a time (only one batch of images is ever
    decoded in memory). ``load`` turns an item into what ``encode`` takes (an image path into a
    PIL image) and may raise :class:`BadInputError`; such items are skipped (recorded in the
    shard and in ``job.skip_log``) unless the skip log is strict. A text store keeps each
    row's text: ``row_text(item)``, by default what was encoded. Returns the opened store on
    the main process (``None`` elsewhere).
    """
    out = Path(out_dir)
    job = job if job is not None else Job()
    if not items:
        raise PairfreeError(f"nothing to encode into {out}: no items ({job.skip_log.summary()})")
    ids = [it.id for it in items]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise PairfreeError(f"duplicate id {dup!r} among the items to encode into {out}")
    n_shards = max(1, -(-len(items) // shard_size))
    digest = _plan_digest(items, info, shard_size)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("plan_digest") != digest:
            what = "its items or shard size differ"
            if manifest.get("encoder") != info.encoder:
                what = (
                    f"it was encoded with {manifest.get('encoder')}, this run uses "
                    f"{info.encoder} (other weights or preprocessing)"
                )
            raise PairfreeError(
                f"{out} already holds a different store: {what}; choose another output or delete it"
            )
    elif job.is_main_process:
        manifest = {
            "format": FORMAT,
            **info.__dict__,
            "shard_size": shard_size,
            "num_items": len(items),
            "num_shards": n_shards,
            "plan_digest": digest,
            "complete": False,
        }
        atomic_write_json(manifest_path, manifest)
    job.wait_for_everyone()

    mine = list(range(job.process_index, n_shards, job.num_processes))
    todo = [s for s in mine if not (out / f"{_shard_name(s)}.npy").exists()]
    bar = tqdm(
        total=sum(len(items[s * shard_size : (s + 1) * shard_size]) for s in todo),
        desc=f"encode {info.kind}",
        disable=not job.show_progress,
        unit="item",
    )
    for s in todo:
        shard_items = items[s * shard_size : (s + 1) * shard_size]
        kept, texts, arrays, skipped = [], [], [], []
        for b in range(0, len(shard_items), batch_size):
            values = []
            for it in shard_items[b : b + batch_size]:
                try:
                    values.append(load(it) if load is not None else it.value)
                    kept.append(it)
                except BadInputError as err:
                    job.skip_log.skip(err)
                    skipped.append(err.to_record())
                    continue
                if info.kind == "text":
                    texts.append(row_text(it) if row_text is not None else values[-1])
            if values:
                arrays.append(encode(values).to(torch.float32).numpy().astype(info.dtype))
            bar.update(len(shard_items[b : b + batch_size]))
        array = np.concatenate(arrays) if arrays else np.empty((0, 0), dtype=info.dtype)
        meta: dict[str, Any] = {"ids": [it.id for it in kept], "skipped": skipped}
        if info.kind == "text":
            meta["texts"] = texts
        atomic_write_json(out / f"{_shard_name(s)}.json", meta, indent=None)
        with atomic_path(out / f"{_shard_name(s)}.npy") as tmp, open(tmp, "wb") as f:
            np.save(f, array)
    bar.close()

    job.wait_for_everyone()
    if not job.is_main_process:
        return None
    missing = [s for s in range(n_shards) if not (out / f"{_shard_name(s)}.npy").exists()]
    if missing:
        raise PairfreeError(f"{out}: shards {missing[:5]} were not written by any process")
    shapes = [np.load(out / f"{_shard_name(s)}.npy", mmap_mode="r").shape for s in range(n_shards)]
    manifest = json.loads(manifest_path.read_text())
    manifest["count"] = sum(shape[0] for shape in shapes)
    if not manifest["count"]:  # an empty store would only block the corrected rerun
        shutil.rmtree(out)
        raise PairfreeError(
            f"every one of the {len(items)} items was skipped; nothing written to {out} "
            f"({job.skip_log.summary()})"
        )
    manifest["dim"] = next((int(shape[-1]) for shape in shapes if shape[0]), 0)
    manifest["complete"] = True
    atomic_write_json(manifest_path, manifest)
    return FeatureStore(out)


class FeatureStore:
    """A finished store, opened read-only. Shards are memory-mapped, not read into RAM."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            raise PairfreeError(f"{self.path} is not a feature store (no manifest.json)")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise PairfreeError(f"{manifest_path}: unknown format {self.manifest.get('format')!r}")
        if not self.manifest.get("complete"):
            raise PairfreeError(
                f"{self.path} is incomplete (an encode run stopped early); rerun the same "
                "`pairfree encode` command to finish it"
            )
        self._shards = [
            np.load(self.path / f"{_shard_name(s)}.npy", mmap_mode="r")
            for s in range(self.manifest["num_shards"])
        ]
        metas = [
            json.loads((self.path / f"{_shard_name(s)}.json").read_text())
            for s in range(self.manifest["num_shards"])
        ]
        self.ids: list[str] = [i for m in metas for i in m["ids"]]
        self.texts: list[str] | None = (
            [t for m in metas for t in m["texts"]] if self.kind == "text" else None
        )
        self.skipped: list[dict] = [r for m in metas for r in m["skipped"]]
        self._offsets = np.cumsum([0] + [len(a) for a in self._shards])

    @property
    def encoder(self) -> str:
        return self.manifest["encoder"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def normalized(self) -> bool:
        return self.manifest["normalized"]

    @property
    def dim(self) -> int:
        return int(self.manifest["dim"])

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._id_rows

    @functools.cached_property
    def _id_rows(self) -> dict[str, int]:
        return {item_id: row for row, item_id in enumerate(self.ids)}

    @functools.cached_property
    def _text_rows(self) -> dict[str, int]:
        if self.texts is None:
            raise PairfreeError(f"{self.path} holds image features, not texts")
        return {text: row for row, text in enumerate(self.texts)}  # a repeated text: its last row

    def row(self, item_id: str) -> int:
        """The row of an item, by the id it was encoded under (skipped items have none)."""
        try:
            return self._id_rows[item_id]
        except KeyError:
            raise PairfreeError(f"{self.path}: no row for id {item_id!r}") from None

    def text_row(self, text: str) -> int:
        """The row of a caption, by its text: how the recipes find a caption's embedding."""
        try:
            return self._text_rows[text]
        except KeyError:
            raise PairfreeError(f"{self.path}: no row for the caption {text!r}") from None

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(index)
        s = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return np.asarray(self._shards[s][index - self._offsets[s]], dtype=np.float32)

    def iter_shards(self) -> Iterator[np.ndarray]:
        yield from self._shards

    def tensor(self) -> torch.Tensor:
        """All rows as one float32 tensor (a copy; use :meth:`iter_shards` for huge stores)."""
        nonempty = [np.asarray(a, dtype=np.float32) for a in self._shards if len(a)]
        if not nonempty:
            return torch.empty(0, self.dim)
        return torch.from_numpy(np.concatenate(nonempty))
