"""Atomic file writes: a crash mid-write leaves the old file (or none), never half a file."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pairfree.errors import BadInputError, PairfreeError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def strict_json(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float replaced by ``None``: JSON has no NaN, and
    strict readers reject it (a metric that does not apply is null, shown as n/a)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 2) -> None:
    """Strict JSON (see :func:`strict_json`), written atomically."""
    text = json.dumps(strict_json(obj), indent=indent, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


def read_user_text(path: str | Path) -> str:
    """The text of a file a user gave; a missing file, a folder and bytes that are not UTF-8
    text are each a :class:`BadInputError` naming the file."""
    path = Path(path)
    if not path.exists():
        raise BadInputError(path, "does not exist")
    if path.is_dir():
        raise BadInputError(path, "is a folder, not a file")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise BadInputError(path, f"not UTF-8 text (byte {e.start} is not)") from None


def read_json(path: str | Path) -> Any:
    """A JSON file a user gave (see :func:`read_user_text`); bad JSON names its line."""
    try:
        return json.loads(read_user_text(path))
    except json.JSONDecodeError as e:
        raise BadInputError(path, f"not valid JSON: {e.msg}", line=e.lineno) from None


def read_json_config(path: str | Path, fmt: str, what: str) -> dict[str, Any]:
    """A checkpoint's JSON config, checked to exist, parse and carry ``"format": fmt``."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(path, f"missing: not a {what} checkpoint")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise BadInputError(path, f'not a {fmt} config (no "format": "{fmt}")')
    return meta


def check_output(
    path: Path, *, inputs: Iterable[Path | str | None] = (), folder: bool = False
) -> None:
    """Refuse, before any work, an output that would overwrite an input, a file where a folder
    belongs (or the reverse), or a place that cannot be written."""
    target = path.resolve()
    for given in inputs:
        if given is not None and Path(given).exists() and Path(given).resolve() == target:
            raise PairfreeError(f"{path} is an input of this command; choose another output")
    if folder and path.exists() and not path.is_dir():
        raise PairfreeError(f"{path} exists and is a file, not a folder")
    if not folder and path.is_dir():
        raise PairfreeError(f"{path} is a folder; give a file name for the output")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:  # a real write: permission bits say nothing to root, or of a read-only file system
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise PairfreeError(
            f"cannot write {path}: {parent} is not writable ({error.strerror})"
        ) from None
