"""Readers for caption corpora and captioned-image datasets.

Every format is parsed into the same two things: the captions (what text-only training reads)
and the images with their file names (what captioning and evaluation read). Image ids are
always strings; COCO's integer ids become ``str(int)``, as in COCO results files.

Formats (``format=`` name, auto-detected from the extension and, for JSON, the contents):

- ``karpathy``: ``dataset_coco.json`` / ``dataset_flickr30k.json`` (``images[].{filename,
  filepath, split, sentences[].raw, cocoid}``); split ``train`` is train + restval. Ids are the
  ``cocoid`` where there is one, else the file name's stem (Flickr30k's photo id), which is
  what :func:`~pairfree.data.images.image_id_for` gives the same file.
- ``nocaps``: NoCaps ``images[].{id, file_name, domain}``, ``annotations[].{image_id, caption}``.
- ``coco``: COCO captions ``images[].{id, file_name}``, ``annotations[].{image_id, caption}``.
- ``cc``: Conceptual Captions TSV, ``caption<TAB>url`` per line (captions only).
- ``text``: one caption or sentence per line (captions only).
- ``jsonl``: one object per line with ``caption`` or ``text``, optional ``image_id``/``image``.

Only Karpathy files hold several splits; other files are one split and ignore ``split``.
Blank lines separate nothing and are ignored. A bad record (an empty caption, a malformed
line, a missing field) is a :class:`BadInputError` naming the file and the line or id: raised
when no ``skip_log`` is given, else recorded there and skipped.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pairfree.data.images import ImageRoot, image_id_for
from pairfree.errors import BadInputError, PairfreeError, SkipLog, id_clashes

CORPUS_FORMATS: tuple[str, ...] = ("karpathy", "nocaps", "coco", "cc", "text", "jsonl")
SPLITS: tuple[str, ...] = ("train", "val", "test")

_KARPATHY_SPLITS = {"train": {"train", "restval"}, "val": {"val"}, "test": {"test"}}
_CAPTIONS_ONLY = ("cc", "text")
_JSON_DOCUMENT = "json"  # one JSON document: karpathy, nocaps or coco, told apart by its keys
_EXTENSIONS = {
    ".json": _JSON_DOCUMENT,
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".tsv": "cc",
    ".txt": "text",
}


@dataclass(frozen=True)
class Caption:
    """One caption and where it came from (``line`` for line-based files)."""

    text: str
    image_id: str | None
    source: str
    line: int | None


@dataclass(frozen=True)
class ImageItem:
    """One image of a dataset split with its reference captions."""

    image_id: str
    path: Path | None
    references: tuple[str, ...]
    domain: str | None = None


@dataclass(frozen=True)
class _Image:
    file: str | None  # relative to the image root, as written in the dataset file
    place: str  # where the file lists it: "line 3" or "images[3]"
    line: int | None = None
    domain: str | None = None


@dataclass
class _Corpus:
    format: str
    captions: list[Caption] = field(default_factory=list)
    images: dict[str, _Image] = field(default_factory=dict)
    clashes: dict[str, list[str]] = field(default_factory=dict)  # id -> places listing it

    def add_image(self, image_id: str, image: _Image) -> None:
        """List an image once. JSONL files repeat an image on each of its caption lines,
        which is one image unless the lines name different files; a JSON file listing an
        id twice is a clash, since the two entries' captions would silently merge."""
        known = self.images.get(image_id)
        if known is None:
            self.images[image_id] = image
        elif self.format != "jsonl" or (
            known.file is not None and image.file is not None and known.file != image.file
        ):
            self.clashes.setdefault(image_id, [known.place]).append(image.place)


def _reject(error: BadInputError, skip_log: SkipLog | None) -> None:
    if skip_log is None:
        raise error
    skip_log.skip(error)


def _caption_text(
    value: Any, path: Path, *, line: int | None = None, item_id: str | int | None = None
) -> str:
    if not isinstance(value, str):
        raise BadInputError(path, "caption is not a string", line=line, item_id=item_id)
    text = value.strip()
    if not text:
        raise BadInputError(path, "empty caption", line=line, item_id=item_id)
    return text


def _field(record: Any, key: str, path: Path, item_id: str | int) -> Any:
    if not isinstance(record, dict) or key not in record:
        raise BadInputError(path, f"record has no {key!r} field", item_id=item_id)
    return record[key]


def _record_id(record: Any, keys: tuple[str, ...], fallback: str) -> str | int:
    """The id a record is reported under: its own id field if it has one."""
    if isinstance(record, dict):
        for key in keys:
            if isinstance(record.get(key), (str, int)):
                return record[key]
    return fallback


# ---------------------------------------------------------------- line-based formats


def _lines(path: Path, skip_log: SkipLog | None) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of the non-blank lines; each line is decoded on its own so
    that one bad byte costs one line, not the file."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError:
                _reject(BadInputError(path, "not valid UTF-8", line=number), skip_log)
                continue
            if text.strip():
                yield number, text.rstrip("\r\n")


def _text_line(path: Path, number: int, line: str, corpus: _Corpus) -> None:
    corpus.captions.append(Caption(line.strip(), None, str(path), number))


def _cc_line(path: Path, number: int, line: str, corpus: _Corpus) -> None:
    caption, tab, url = line.partition("\t")
    if not tab:
        raise BadInputError(path, "expected 'caption<TAB>url', found no tab", line=number)
    text = _caption_text(caption, path, line=number)
    corpus.captions.append(Caption(text, url.strip() or None, str(path), number))


def _jsonl_line(path: Path, number: int, line: str, corpus: _Corpus) -> None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise BadInputError(path, f"not valid JSON: {error.msg}", line=number) from error
    if not isinstance(record, dict):
        raise BadInputError(path, "expected a JSON object", line=number)
    key = "caption" if "caption" in record else "text"
    if key not in record:
        raise BadInputError(path, "object has no 'caption' or 'text' field", line=number)
    text = _caption_text(record[key], path, line=number)
    image, image_id = record.get("image"), record.get("image_id")
    if image is not None and not isinstance(image, str):
        raise BadInputError(path, "'image' is not a file name", line=number)
    if image_id is None and image is not None:
        image_id = image_id_for(image)
    if image_id is not None:
        image_id = str(image_id)
        corpus.add_image(image_id, _Image(image, f"line {number}", line=number))
    corpus.captions.append(Caption(text, image_id, str(path), number))


_LINE_PARSERS: dict[str, Callable[[Path, int, str, _Corpus], None]] = {
    "text": _text_line,
    "cc": _cc_line,
    "jsonl": _jsonl_line,
}


def _parse_lines(path: Path, format: str, skip_log: SkipLog | None) -> _Corpus:
    corpus = _Corpus(format)
    parse = _LINE_PARSERS[format]
    for number, line in _lines(path, skip_log):
        try:
            parse(path, number, line, corpus)
        except BadInputError as error:
            _reject(error, skip_log)
    return corpus


# ---------------------------------------------------------------- JSON formats


def _load_json(path: Path) -> Any:
    try:
        with path.open("r", encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as error:
        raise BadInputError(path, f"not valid JSON: {error.msg}", line=error.lineno) from error
    except UnicodeDecodeError as error:
        raise BadInputError(path, "not valid UTF-8") from error


def _json_format(path: Path, data: Any) -> str:
    """Tell the JSON dataset formats apart by their keys."""
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        first = next((image for image in data["images"] if isinstance(image, dict)), {})
        if "sentences" in first or "dataset" in data:
            return "karpathy"
        if "domain" in first:
            return "nocaps"
        if "annotations" in data:
            return "coco"
    raise PairfreeError(
        f"{path}: cannot tell which dataset format this JSON file is; pass a format, one of "
        f"{', '.join(CORPUS_FORMATS)}"
    )


def _json_list(path: Path, data: Any, key: str, format: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise BadInputError(path, f"not a {format} file: expected an object with a {key!r} list")
    return data[key]


def _parse_karpathy(path: Path, data: Any, split: str, skip_log: SkipLog | None) -> _Corpus:
    corpus = _Corpus("karpathy")
    wanted = _KARPATHY_SPLITS[split]
    for index, record in enumerate(_json_list(path, data, "images", "karpathy")):
        item_id = _record_id(record, ("cocoid", "imgid", "filename"), f"images[{index}]")
        try:
            if _field(record, "split", path, item_id) not in wanted:
                continue
            filename = _field(record, "filename", path, item_id)
            sentences = _field(record, "sentences", path, item_id)
            if not isinstance(filename, str) or not isinstance(sentences, list):
                raise BadInputError(path, "malformed 'filename' or 'sentences'", item_id=item_id)
        except BadInputError as error:
            _reject(error, skip_log)
            continue
        image_id = str(record["cocoid"]) if "cocoid" in record else image_id_for(filename)
        file = posixpath.join(record.get("filepath", ""), filename)
        corpus.add_image(image_id, _Image(file, f"images[{index}]"))
        for number, sentence in enumerate(sentences):
            sentence_id = _record_id(sentence, ("sentid",), f"{image_id}/sentences[{number}]")
            try:
                raw = _field(sentence, "raw", path, sentence_id)
                text = _caption_text(raw, path, item_id=sentence_id)
            except BadInputError as error:
                _reject(error, skip_log)
                continue
            corpus.captions.append(Caption(text, image_id, str(path), None))
    return corpus


def _parse_coco(path: Path, data: Any, format: str, skip_log: SkipLog | None) -> _Corpus:
    """COCO captions and NoCaps share one layout; NoCaps adds each image's domain."""
    corpus = _Corpus(format)
    for index, record in enumerate(_json_list(path, data, "images", format)):
        item_id = _record_id(record, ("id",), f"images[{index}]")
        try:
            image_id = str(_field(record, "id", path, item_id))
            filename = _field(record, "file_name", path, item_id)
            if not isinstance(filename, str):
                raise BadInputError(path, "'file_name' is not a file name", item_id=item_id)
        except BadInputError as error:
            _reject(error, skip_log)
            continue
        corpus.add_image(
            image_id, _Image(filename, f"images[{index}]", domain=record.get("domain"))
        )
    if format == "nocaps" and "annotations" not in data:
        annotations = []  # the NoCaps test file lists images without captions
    else:
        annotations = _json_list(path, data, "annotations", format)
    for index, record in enumerate(annotations):
        item_id = _record_id(record, ("id",), f"annotations[{index}]")
        try:
            image_id = str(_field(record, "image_id", path, item_id))
            if image_id not in corpus.images:
                raise BadInputError(path, f"caption of unknown image {image_id}", item_id=item_id)
            text = _caption_text(_field(record, "caption", path, item_id), path, item_id=item_id)
        except BadInputError as error:
            _reject(error, skip_log)
            continue
        corpus.captions.append(Caption(text, image_id, str(path), None))
    return corpus


# ---------------------------------------------------------------- dispatch


def _sniff(path: Path) -> str:
    """The format a file's extension or first line shows; JSON documents are told apart later."""
    suffix = path.suffix.lower()
    if suffix in _EXTENSIONS:
        return _EXTENSIONS[suffix]
    with path.open("rb") as f:
        head = f.read(1 << 16)
    text = head.decode("utf-8-sig", errors="replace")
    first = next((line for line in text.splitlines() if line.strip()), "")
    if first.lstrip().startswith(("{", "[")):
        try:
            record = json.loads(first)
        except json.JSONDecodeError:
            return _JSON_DOCUMENT
        return "jsonl" if isinstance(record, dict) and "images" not in record else _JSON_DOCUMENT
    if first and "\0" not in text:
        return "cc" if "\t" in first else "text"
    raise PairfreeError(
        f"{path}: cannot tell the corpus format from its name or contents; pass a format, one "
        f"of {', '.join(CORPUS_FORMATS)}"
    )


def _read(path: str | Path, format: str, split: str, skip_log: SkipLog | None) -> _Corpus:
    corpus = _parse(Path(path), format, split, skip_log)
    if corpus.clashes:
        raise id_clashes(
            corpus.clashes,
            f"are listed more than once in {path}",
            "their captions would merge; list each image once",
        )
    return corpus


def _parse(path: Path, format: str, split: str, skip_log: SkipLog | None) -> _Corpus:
    if format != "auto" and format not in CORPUS_FORMATS:
        raise PairfreeError(
            f"unknown corpus format {format!r}; expected auto or one of {', '.join(CORPUS_FORMATS)}"
        )
    if split not in SPLITS:
        raise PairfreeError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if not path.is_file():
        raise BadInputError(path, "no such file")
    if format == "auto":
        format = _sniff(path)
    if format in _LINE_PARSERS:
        return _parse_lines(path, format, skip_log)
    data = _load_json(path)
    if format == _JSON_DOCUMENT:
        format = _json_format(path, data)
    if format == "karpathy":
        return _parse_karpathy(path, data, split, skip_log)
    return _parse_coco(path, data, format, skip_log)


def read_captions(
    path: str | Path,
    *,
    format: str = "auto",
    split: str = "train",
    skip_log: SkipLog | None = None,
) -> list[Caption]:
    """All captions of a corpus file (of ``split``, for Karpathy files), in file order."""
    return _read(path, format, split, skip_log).captions


def read_images(
    path: str | Path,
    *,
    format: str = "auto",
    split: str = "test",
    image_root: str | Path | None = None,
    allow_outside_root: bool = False,
    files: bool = True,
    skip_log: SkipLog | None = None,
) -> list[ImageItem]:
    """The images of a dataset split with their reference captions, in file order.

    File names resolve against ``image_root`` (default: the dataset file's folder); Karpathy
    files give ``image_root/filepath/filename``. A name that leads outside the root (``..``,
    an absolute path, a link out of it) is a :class:`BadInputError` unless
    ``allow_outside_root``, so a dataset file cannot make a command read other files. Images
    listed without a file (JSONL records with only an ``image_id``) get ``path=None``, as every
    image does with ``files=False`` (for readers that open no image: file names are then
    neither made nor checked).
    """
    corpus = _read(path, format, split, skip_log)
    if corpus.format in _CAPTIONS_ONLY:
        raise PairfreeError(
            f"{path}: a {corpus.format} file holds captions only, no images; use one of "
            f"{', '.join(f for f in CORPUS_FORMATS if f not in _CAPTIONS_ONLY)}"
        )
    root = ImageRoot(image_root if image_root is not None else Path(path).parent)
    references: dict[str, list[str]] = {image_id: [] for image_id in corpus.images}
    for caption in corpus.captions:
        if caption.image_id is not None:
            references[caption.image_id].append(caption.text)
    items = []
    for image_id, image in corpus.images.items():
        file = image.file if files else None
        if file is not None and not allow_outside_root:
            target = root.outside(file)
            if target is not None:
                message = (
                    ("" if image.line is not None else f"{image.place}: ")
                    + f"file name {file!r} leads outside the image root {root.folder} "
                    f"(to {target}); pass --allow-outside-root if that is meant"
                )
                _reject(BadInputError(path, message, line=image.line, item_id=image_id), skip_log)
                continue
        items.append(
            ImageItem(
                image_id=image_id,
                path=root.folder / file if file is not None else None,
                references=tuple(references[image_id]),
                domain=image.domain,
            )
        )
    return items


def read_references(
    path: str | Path,
    *,
    format: str = "auto",
    split: str = "test",
    skip_log: SkipLog | None = None,
) -> dict[str, list[str]]:
    """image id -> reference captions, for evaluation; images without references are left
    out because no metric can score them."""
    items = read_images(path, format=format, split=split, files=False, skip_log=skip_log)
    return {item.image_id: list(item.references) for item in items if item.references}
