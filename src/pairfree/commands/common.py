"""Arguments and helpers several commands share."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from pairfree.errors import PairfreeError, where
from pairfree.io import atomic_write_text


def at_least(minimum: int, *, at_most: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number >= ``minimum`` (and <= ``at_most``)."""

    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        if at_most is not None and value > at_most:
            raise argparse.ArgumentTypeError(f"must be at most {at_most}, not {value}")
        return value

    return whole_number


positive_int = at_least(1)


def add_strict(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad input item instead of skipping and reporting it",
    )


def add_image_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--image-root", default=None, help="folder the dataset's file names are relative to"
    )
    parser.add_argument(
        "--allow-outside-root",
        action="store_true",
        help="read dataset images whose names lead outside --image-root (../, absolute paths, "
        "links out of it); without it they are skipped and reported",
    )


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        type=_device,
        help="torch device: auto (default: the GPU when there is one, else the CPU), cpu, "
        "cuda, cuda:1, mps",
    )


def _device(name: str) -> str:
    from pairfree.job import resolve_device

    try:
        return resolve_device(name)
    except PairfreeError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def report_skips(records: list[dict], beside: Path) -> None:
    """Print the skip count and write the list next to the output (``<out>.skipped.jsonl``)."""
    if not records:
        return
    path = beside.with_name(beside.name + ".skipped.jsonl")
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    first = "; ".join(
        f"{where(r['source'], r.get('line'), r.get('id'))}: {r['reason']}" for r in records[:3]
    )
    print(f"skipped {len(records)} bad items ({first}{' ...' if len(records) > 3 else ''})")
    print(f"list of skipped items: {path}")
