"""Image files: decoding, collecting them from command-line arguments, and naming them.

Images are decoded eagerly so that a truncated or corrupt file fails where it is read, with its
name, and can be skipped there instead of crashing a batch halfway through encoding.
"""

from __future__ import annotations

import errno
import fnmatch
import glob
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
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
# CLIP resizes an image's short side to its input size (224 px): a 1 x 80M-pixel sliver, small
# on disk and under the pixel limit, would become billions of pixels. Long strips (1:50) pass.
MAX_ASPECT_RATIO = 200

# COCO 2014 file names (COCO_val2014_000000391895) and 2017 ones (000000391895) carry the
# integer image id that COCO annotations and results files use.
_COCO_STEM = re.compile(r"COCO_[A-Za-z]+\d*_(\d+)")
_GLOB_MAGIC = re.compile(r"[*?[]")


def load_image(path: str | Path) -> Image.Image:
    """Decode ``path`` fully into an RGB image.

    EXIF orientation is applied (phone photos are stored sideways) and transparent images are
    composited onto white, so every backend sees the picture a viewer sees: an animation is
    its first frame, a 16-bit or float image is scaled to 8 bits. An image over the pixel limit
    or thinner than 1:``MAX_ASPECT_RATIO`` is refused from its header, before decoding.
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
            if max(image.size) > MAX_ASPECT_RATIO * max(1, min(image.size)):
                raise BadInputError(
                    path,
                    f"{image.width}x{image.height} pixels is beyond an aspect ratio of "
                    f"1:{MAX_ASPECT_RATIO} (CLIP's resize of its short side would blow it up)",
                )
            image.load()  # the first frame of an animation
            image = ImageOps.exif_transpose(image)
            if image.mode.startswith(("I", "F")):
                image = _to_8_bits(image)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, rgba).convert("RGB")
            return image.convert("RGB")
    except Image.DecompressionBombError as error:  # PIL's own check, at twice its limit
        raise BadInputError(path, f"{error} (set {MAX_PIXELS_VARIABLE} to raise it)") from error
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise BadInputError(path, f"cannot decode image: {error}") from error


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float grayscale image as 8-bit ``L``: integers are taken as 16-bit
    (PNG's depth), floats in [0, 1] as fractions; PIL's own conversion clips them at 255, so a
    16-bit picture would come out white and a float one black."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / 65535.0
    return Image.fromarray(np.clip(values * scale, 0, 255).round().astype(np.uint8), mode="L")


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


class ImageRoot:
    """The folder a dataset file's image names are relative to.

    A name that leads outside it (``../x.png``, an absolute path, or a link inside the folder
    that points out of it) would make a dataset file read files its user never gave, so
    :meth:`outside` names where it leads and the readers refuse it. Each folder is resolved
    once, so checking a 100k-image split costs one ``lstat`` per file.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self._real = os.path.realpath(self.folder)
        self._real_folders: dict[str, str] = {}

    def outside(self, name: str) -> str | None:
        """Where ``folder/name`` really is (links followed) if that is outside the folder,
        else None."""
        path = self.folder / name
        folder = str(path.parent)
        if folder not in self._real_folders:
            self._real_folders[folder] = os.path.realpath(folder)
        real = os.path.join(self._real_folders[folder], path.name)
        if path.name == ".." or os.path.islink(real):
            real = os.path.realpath(real)
        return None if os.path.commonpath([self._real, real]) == self._real else real


def _report(error: BadInputError, skip_log: SkipLog | None) -> None:
    if skip_log is None:
        raise error
    skip_log.skip(error)


def _walk(folder: Path, skip_log: SkipLog | None) -> Iterator[Path]:
    """The files under ``folder``, following links to folders but entering each folder (by
    device and inode) once, so that a link back to a folder above ends instead of recursing
    forever. A looping or broken link is reported and skipped. Hidden files and folders (such
    as macOS ``._name.jpg`` resource forks) are left out because they are not pictures."""
    entered: set[tuple[int, int]] = set()

    def visit(path: Path, above: frozenset[tuple[int, int]]) -> Iterator[Path]:
        info = path.stat()
        key = (info.st_dev, info.st_ino)
        if key in above:
            _report(BadInputError(path, "link loops back to a folder above it; skipped"), skip_log)
            return
        if key in entered:  # reached again through another link: its files are listed
            return
        entered.add(key)
        try:
            entries = sorted(os.scandir(path), key=lambda entry: entry.name)
        except OSError as error:
            _report(BadInputError(path, f"cannot list folder: {error.strerror}"), skip_log)
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = Path(entry.path)
            if entry.is_symlink() and not os.path.exists(child):
                problem = "link loops" if _loops(child) else "broken link"
                _report(BadInputError(child, f"{problem}; skipped"), skip_log)
            elif entry.is_dir():
                yield from visit(child, above | {key})
            elif entry.is_file():
                yield child

    yield from visit(folder, frozenset())


def _loops(link: Path) -> bool:
    try:
        link.resolve(strict=True)
    except RuntimeError:  # Python < 3.13
        return True
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def _images_in_folder(folder: Path, skip_log: SkipLog | None) -> list[Path]:
    """Image files under ``folder``, recursively and sorted."""
    return sorted(p for p in _walk(folder, skip_log) if is_image_file(p))


def _matches(parts: tuple[str, ...], pattern: tuple[str, ...]) -> bool:
    """Whether path parts match glob pattern parts; ``**`` matches any number of parts."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return (
        bool(parts)
        and fnmatch.fnmatchcase(parts[0], pattern[0])
        and _matches(parts[1:], pattern[1:])
    )


def _recursive_glob(pattern: str, skip_log: SkipLog | None) -> list[Path]:
    """Image files a ``**`` pattern names, found by :func:`_walk` (``glob.glob`` follows
    linked folders with no end when they loop). A matched folder gives the images under it."""
    parts = Path(pattern).parts
    fixed = next(i for i, part in enumerate(parts) if _GLOB_MAGIC.search(part))
    base, wanted = Path(*parts[:fixed]) if fixed else Path(), parts[fixed:]
    if not base.is_dir():
        return []
    found = []
    for path in _walk(base, skip_log):
        names = path.relative_to(base).parts
        if is_image_file(path) and any(
            _matches(names[:end], wanted) for end in range(len(names), 0, -1)
        ):
            found.append(path)
    return sorted(found)


def _expand(argument: str | Path, skip_log: SkipLog | None) -> list[Path]:
    path = Path(argument)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _images_in_folder(path, skip_log)
        if not found:
            raise BadInputError(path, f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder")
        return found
    if _GLOB_MAGIC.search(str(argument)):
        if "**" in Path(argument).parts:
            found = _recursive_glob(str(argument), skip_log)
        else:
            found = []
            for match in sorted(glob.glob(str(argument))):
                match_path = Path(match)
                if match_path.is_dir():
                    found.extend(_images_in_folder(match_path, skip_log))
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
            expanded = _expand(argument, skip_log)
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
