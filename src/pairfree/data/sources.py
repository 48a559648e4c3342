"""Where images come from: a dataset file's split, or image files, folders and globs.

Every command and recipe that reads images goes through :func:`image_sources` (which images,
named how) and :func:`load_images` (decode them, skip and report the bad ones), so a dataset and
a folder of photos are interchangeable wherever images are taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from pairfree.data.corpus import ImageItem, read_images
from pairfree.data.images import collect_image_paths, image_id_for, load_image
from pairfree.errors import BadInputError, SkipLog, id_clashes

DATASET_SUFFIXES = (".json", ".jsonl", ".ndjson")


def is_dataset_file(path: str | Path) -> bool:
    """Named like a dataset file (a missing one is then reported as a missing dataset)."""
    return Path(path).suffix.lower() in DATASET_SUFFIXES


def dataset_images(
    path: str | Path,
    *,
    split: str = "test",
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
    format: str = "auto",
    skip_log: SkipLog | None = None,
) -> list[ImageItem]:
    """The images of a dataset split that have a file; records without one, or whose file is
    outside the image root (see :func:`read_images`), are reported."""
    items = read_images(
        path,
        format=format,
        split=split,
        image_root=image_root,
        allow_outside_root=allow_outside_root,
        skip_log=skip_log,
    )
    kept = []
    for item in items:
        if item.path is not None:
            kept.append(item)
        elif skip_log is not None:
            skip_log.skip(
                BadInputError(path, "no image file for this record", item_id=item.image_id)
            )
    return kept


def image_sources(
    inputs: str | Path | Sequence[str | Path],
    *,
    split: str = "test",
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
    format: str = "auto",
    skip_log: SkipLog | None = None,
) -> list[tuple[str, Path]]:
    """``(image_id, path)`` pairs: of a dataset file's ``split`` when ``inputs`` is one dataset
    file (.json/.jsonl), else of image files, folders and globs. Two files that would get the
    same id (``a/x.png`` and ``b/x.png``, ``7.png`` and ``007.png``) are refused, since one's
    caption would overwrite the other's."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if len(inputs) == 1 and is_dataset_file(inputs[0]):
        items = dataset_images(
            inputs[0],
            split=split,
            image_root=image_root,
            allow_outside_root=allow_outside_root,
            format=format,
            skip_log=skip_log,
        )
        return [(item.image_id, item.path) for item in items]
    pairs = [(image_id_for(p), p) for p in collect_image_paths(inputs, skip_log=skip_log)]
    by_id: dict[str, list[Path]] = {}
    for image_id, path in pairs:
        by_id.setdefault(image_id, []).append(path)
    clashes = {i: [str(p) for p in paths] for i, paths in by_id.items() if len(paths) > 1}
    if clashes:
        raise id_clashes(
            clashes,
            "would be given to more than one file",
            "image ids come from file names, so rename the files or run them separately",
        )
    return pairs


def load_images(
    sources: Sequence[tuple[str, str | Path]], skip_log: SkipLog
) -> tuple[list[str], list[Image.Image]]:
    """Decode every image; an unreadable one goes to ``skip_log`` and the rest are kept."""
    ids, images = [], []
    for image_id, path in sources:
        try:
            images.append(load_image(path))
            ids.append(image_id)
        except BadInputError as err:
            skip_log.skip(err)
    return ids, images
