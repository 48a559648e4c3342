"""Image files: decoding, collecting them from command-line arguments, and naming them.

Images are decoded eagerly so that a truncated or corrupt file fails where it is read, with its
name, and can be skipped there instead of crashing a batch halfway through encoding.
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from pairfree.errors import BadInputError, PairfreeError, SkipLog

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
)

MAX_PIXELS_VARIABLE = "PAIRFREE_MAX_IMAGE_PIXELS"

# COCO 2014 file names (COCO_val2014_000000391895) and 2017 ones (000000391895) carry the
# integer image id that COCO annotations and results files use.
_COCO_STEM = re.compile(r"COCO_[A-Za-z]+\d*_(\d+)")
_GLOB_MAGIC = re.compile(r"[*?[]")


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image.

    EXIF orientation is applied (phone photos are stored sideways) and transparent images are
    composited onto white, so every backend sees the picture a viewer sees.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, "no such image file")
    if path.stat().st_size == 0:
        raise BadInputError(path, "empty image file")
    limit = max_image_pixels()
    try:
        with Image.open(path) as image:
            if limit and image.width * image.height > limit:
                raise BadInputError(
                    path,
                    f"{image.width}x{image.height} pixels is over the limit of {limit} "
                    f"(set {MAX_PIXELS_VARIABLE} to raise it)",
                )
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:  # PIL's own check, at twice its limit
        raise BadInputError(path, f"{error} (set {MAX_PIXELS_VARIABLE} to raise it)") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadInputError(path, f"cannot decode image: {error}") from error


_PIL_LIMIT = Image.MAX_IMAGE_PIXELS  # PIL's decompression-bomb limit, as it ships


def max_image_pixels() -> int | None:
    """The largest image (width x height) decoded: ``$PAIRFREE_MAX_IMAGE_PIXELS``, else PIL's
    decompression-bomb limit (about 89 M pixels); 0 for none. A file whose header claims more
    is skipped like any bad image, before its pixels are read."""
    value = os.environ.get(MAX_PIXELS_VARIABLE)
    if value is None:  # PIL's own limit again, even after a run that had the variable set
        Image.MAX_IMAGE_PIXELS = _PIL_LIMIT
        return _PIL_LIMIT
    try:
        limit = int(value)
    except ValueError:
        raise PairfreeError(f"{MAX_PIXELS_VARIABLE}={value!r} is not a whole number") from None
    Image.MAX_IMAGE_PIXELS = limit or None  # PIL's own check must not stop a larger limit
    return limit or None


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _images_in_folder(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively and sorted; hidden files and folders (such as
    macOS ``._name.jpg`` resource forks) are left out because they are not pictures."""
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file()
        and is_image_file(p)
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _expand(argument: str | Path) -> list[Path]:
    path = Path(argument)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _images_in_folder(path)
        if not found:
            raise BadInputError(path, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder")
        return found
    if _GLOB_MAGIC.search(str(argument)):
        found = []
        for match in sorted(glob.glob(str(argument), recursive=True)):
            match_path = Path(match)
            if match_path.is_dir():
                found.extend(_images_in_folder(match_path))
            elif is_image_file(match_path):
                found.append(match_path)
        if not found:
            raise BadInputError(argument, "pattern matches no image files")
        return found
    raise BadInputError(path, "no such file or folder")


def collect_image_paths(
    inputs: Sequence[str | Path], *, skip_log: SkipLog | None = None
) -> list[Path]:
    """Expand command-line arguments (files, folders, glob patterns) into image paths.

    Folders are searched recursively for image extensions; a file named explicitly is taken
    whatever its extension. Each image appears once, in argument order. An argument that yields
    nothing is a :class:`BadInputError`, skipped into ``skip_log`` when one is given.
    """
    paths: list[Path] = []
    seen: set[Path] = set()
    for argument in inputs:
        try:
            expanded = _expand(argument)
        except BadInputError as error:
            if skip_log is None:
                raise
            skip_log.skip(error)
            continue
        for path in expanded:
            key = path.resolve()
            if key not in seen:
                seen.add(key)
                paths.append(path)
    return paths


def image_id_for(path: str | Path) -> str:
    """The id predictions for this image file carry: its stem, except that COCO file names map
    to the integer COCO id (``COCO_val2014_000000391895.jpg`` and ``000000391895.jpg`` both give
    ``"391895"``) so that predictions match COCO annotation ids."""
    stem = Path(path).stem
    match = _COCO_STEM.fullmatch(stem)
    if match:
        return str(int(match.group(1)))
    if stem.isascii() and stem.isdigit():
        return str(int(stem))
    return stem
