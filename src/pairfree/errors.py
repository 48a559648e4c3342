"""User-facing errors and the skip log that batch commands keep.

A batch job must never lose good work because one item is bad: it records the bad item
(file, line or id, reason) in a :class:`SkipLog` and goes on, unless the user asked for
``--strict``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class PairfreeError(Exception):
    """An error whose message is meant for the user; the CLI prints it without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (libraries' load errors run to dozens)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_failure(what: str, name: str, err: BaseException) -> PairfreeError:
    """Why pretrained weights named ``name`` (a folder or a Hub id) could not be loaded, in one
    line: a folder that is not there is said so, rather than as the Hub's complaint that
    ``name`` is not a valid repo id."""
    is_path = name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name
    if is_path and not Path(name).expanduser().exists():
        return PairfreeError(
            f"cannot load {what}: {name} does not exist (a folder of saved weights or a Hub id)"
        )
    return PairfreeError(f"cannot load {what}: {first_line(err)}")


def where(source: str, line: int | None = None, item_id: str | int | None = None) -> str:
    """``file:line (id x)``: how a bad item is named, in errors and in skip summaries."""
    text = source + (f":{line}" if line is not None else "")
    return text + (f" (id {item_id})" if item_id is not None else "")


class BadInputError(PairfreeError):
    """A bad input item; the message names the file and the line or id."""

    def __init__(
        self,
        source: str | Path,
        message: str,
        *,
        line: int | None = None,
        item_id: str | int | None = None,
    ) -> None:
        self.source = str(source)
        self.reason = message
        self.line = line
        self.item_id = item_id
        super().__init__(f"{where(self.source, line, item_id)}: {message}")

    def to_record(self) -> dict:
        return {"source": self.source, "line": self.line, "id": self.item_id, "reason": self.reason}


@dataclass
class SkipLog:
    """Collects skipped items; with ``strict=True`` the first bad item is raised instead."""

    strict: bool = False
    items: list[BadInputError] = field(default_factory=list)

    def skip(self, error: BadInputError) -> None:
        if self.strict:
            raise error
        self.items.append(error)

    def __len__(self) -> int:
        return len(self.items)

    def summary(self) -> str:
        if not self.items:
            return "skipped 0 items"
        first = "; ".join(str(e) for e in self.items[:3])
        more = f" (+{len(self.items) - 3} more)" if len(self.items) > 3 else ""
        return f"skipped {len(self.items)} items: {first}{more}"


def id_clashes(clashes: dict[str, list[str]], what: str, fix: str) -> PairfreeError:
    """One line naming ids that more than one place claims (``a and b -> 'id'``, the first
    five), so that neither place's data silently overwrites or merges into the other's."""
    shown = "; ".join(
        f"{' and '.join(places)} -> {image_id!r}" for image_id, places in list(clashes.items())[:5]
    )
    more = f" (+{len(clashes) - 5} more)" if len(clashes) > 5 else ""
    return PairfreeError(f"{len(clashes)} image ids {what}: {shown}{more}; {fix}")
