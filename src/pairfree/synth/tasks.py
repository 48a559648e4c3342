"""The two LLM tasks of the synthetic-image recipes: their prompts and the parsing of answers.

- ``rephrase`` (SaCap): three rewordings of a caption, each at most 15 words, asked for as JSON
  ``{"1": ..., "2": ..., "3": ...}``; SaCap samples them with temperature 0.6, top-p 0.9.
- ``select-summarize`` (ICSD): from a numbered group of captions, the 5-10 that describe one
  scene consistently, and one objective summary of at most 50 words, asked for as
  ``{'index': list, 'summary': str}``.

The default prompts are the originals' own wording and layout (their exact text is part of what
reproduces their data); a file can replace either (``{caption}`` / ``{captions}`` mark where
the input goes).

Answers are read as the originals read them, by default:

- SaCap's code takes the first ``{"1": "...", "2": "...", "3": "..."}`` its pattern finds in
  the answer, the texts as written, whatever their length or content: rephrasings over 15
  words and the prompt's own ``"text1"`` placeholders are kept (its captions without a match
  leave its training, as they do here);
- ICSD's code ``eval()``s the answer and takes its two keys by position (any names), each
  selected number ``i`` as Python's ``captions[int(i) - 1]``: 0 is the last caption, a repeated
  number pairs that caption twice, and summaries over 50 words are kept. Here nothing is
  evaluated: the answer is read as JSON or as a Python literal (:mod:`pairfree.synth.literal`)
  and given the same meaning.

``strict`` reads them pairfree's checked way instead: at most 15 / 50 words, no template
placeholder echoed back, the keys by name, each index of the group once. An answer that only
the original's reading keeps carries the reason the checked one gives (``lenient``), so a run
says how many there were. Both readings also accept forms the originals lost (JSON inside prose
or a code fence, single quotes, trailing commas, the keys in another order); an answer that
neither can use is rejected with the reason, for the rejects file, as the originals drop such
answers. An empty selection is rejected too: ICSD would draw its summary's image but pair no
caption with it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pairfree.errors import PairfreeError
from pairfree.synth.literal import read_literal_at

REPHRASE_PROMPT = (
    "You are a text rewriting expert. Given a description text: {caption}. Please rephrase this "
    "provided description text into 3 different expressions, with each no longer than 15 "
    'words. Return the results in the JSON format as follows: {{"1": "text1", "2": "text2", '
    '"3": "text3"}}.'
)
SUMMARIZE_PROMPT = (
    "Select and summary sentences in the given sentences set. You should find 5 to 10 "
    "sentences that form a description from the same or different views of the same image. "
    "The meanings of the selected sentences in a group should not conflict with each other. "
    "Summarize the sentences as one not exceed 50 words to describe the scene in objective "
    "style. The summary sentence must be objective and concise, without ambiguity and "
    "uncertainty. Return the selected index and the summary sentence in json format like "
    "{{'index': list,'summary': str}}. Return directly the json format results without "
    "explanation. The given sentences set are: {captions}"
)
REPHRASINGS = 3
REPHRASE_MAX_WORDS = 15
SUMMARY_MAX_WORDS = 50
_PLACEHOLDERS = {"text1", "text2", "text3", "str", "list", "summary", "index", "..."}


# SaCap's reading: keys "1" to "3" in order, each value the shortest run of characters on one
# line up to a quote that a comma (or, for the last, the closing brace) follows; kept as written
_ENTRIES = r",\s*".join(rf'"{k}"\s*:\s*"(.*?)"' for k in range(1, REPHRASINGS + 1))
_REPHRASINGS = re.compile(r"\{\s*" + _ENTRIES + r"\s*\}")


class Rejected(ValueError):
    """An answer that cannot be used; the message says why."""


@dataclass(frozen=True)
class Rephrasings:
    texts: list[str]
    lenient: str | None = None  # why the strict reading rejects what the original's keeps


@dataclass(frozen=True)
class Selection:
    indices: list[int]  # 0-based positions in the group, in the answer's order
    summary: str
    lenient: str | None = None  # why the strict reading rejects what the original's keeps


def load_prompt(path: str | Path | None, default: str, field: str) -> str:
    """The prompt template in ``path`` (default: the original's); it must mark ``{field}``."""
    if path is None:
        return default
    path = Path(path)
    if not path.is_file():
        raise PairfreeError(f"prompt file {path} does not exist")
    template = path.read_text(encoding="utf-8").strip()
    if "{" + field + "}" not in template:
        raise PairfreeError(f"{path}: the prompt must say where the input goes with {{{field}}}")
    return template


def rephrase_prompt(caption: str, template: str = REPHRASE_PROMPT) -> str:
    """SaCap puts the caption in as it is (a final period and all)."""
    return template.format(caption=caption)


def summarize_prompt(captions: Sequence[str], template: str = SUMMARIZE_PROMPT) -> str:
    """ICSD numbers the captions ``<1> ... <2> ...``, each ending with a period."""
    numbered = "".join(
        f"<{i}> {c if c.endswith('.') else c + '.'} " for i, c in enumerate(captions, 1)
    )
    return template.format(captions=numbered)


def parse_rephrasings(answer: str, *, strict: bool = False) -> Rephrasings:
    """Three rewordings from an answer, or :class:`Rejected` (see the module docstring)."""
    match = _REPHRASINGS.search(answer)
    if match:
        texts = list(match.groups())
    else:
        obj = _first_object(answer)
        values = [obj.get(str(i), obj.get(i)) for i in range(1, REPHRASINGS + 1)]
        if any(not isinstance(v, str) for v in values):
            raise Rejected(f'expected string values for keys "1" to "{REPHRASINGS}"')
        texts = [" ".join(v.split()) for v in values]
    problem = next(filter(None, (_text_problem(t, REPHRASE_MAX_WORDS) for t in texts)), None)
    if problem and strict:
        raise Rejected(problem)
    return Rephrasings(texts, problem)


def parse_selection(answer: str, group_size: int, *, strict: bool = False) -> Selection:
    """The selected captions (0-based) and the summary, or :class:`Rejected` (see the module
    docstring)."""
    obj = _first_object(answer)
    problems: list[str] = []

    def waive(problem: str | None) -> None:  # what only the original's reading accepts
        if problem and strict:
            raise Rejected(problem)
        if problem:
            problems.append(problem)

    if "index" in obj and "summary" in obj:
        index, summary = obj["index"], obj["summary"]
    elif len(obj) == 2:  # ICSD unpacks the two keys by position
        (first, index), (second, summary) = obj.items()
        waive(f"keys {first!r} and {second!r}, not 'index' and 'summary'")
    else:
        raise Rejected("expected {'index': list, 'summary': str}")
    if not isinstance(summary, str):
        raise Rejected(f"the summary is not a text: {summary!r}")
    if not isinstance(index, (list, tuple, set, dict, str)):
        raise Rejected(f"the index is not a list: {index!r}")
    if not isinstance(index, list):
        waive(f"the index is a {type(index).__name__}, not a list")
    try:
        chosen = [int(i) for i in index]  # ICSD's int(): "3" and 3.0 are 3
    except (TypeError, ValueError, OverflowError):
        raise Rejected(f"indices are not whole numbers: {index!r}") from None
    if not chosen:
        raise Rejected("no captions selected")
    if any(not 1 - group_size <= i <= group_size for i in chosen):
        raise Rejected(f"indices outside 1..{group_size}: {chosen}")
    if any(i < 1 for i in chosen):  # Python's captions[i - 1] counts these from the end
        waive(f"indices outside 1..{group_size}, read from the end: {chosen}")
    if len(set(chosen)) != len(chosen):
        waive(f"repeated indices: {chosen}")
    summary = " ".join(summary.split())
    waive(_text_problem(summary, SUMMARY_MAX_WORDS))
    lenient = "; ".join(problems) or None
    return Selection([(i - 1) % group_size for i in chosen], summary, lenient)


def _text_problem(text: str, max_words: int) -> str | None:
    words = text.split()
    if not words:
        return "an empty text"
    if text.lower().strip(" .") in _PLACEHOLDERS:
        return f"the prompt's placeholder {text!r} echoed back"
    if len(words) > max_words:
        return f"{len(words)} words, over the limit of {max_words}"
    return None


def _first_object(answer: str) -> dict:
    """The first dict in ``answer`` written as JSON or as a Python literal (prose around it and
    braces inside its strings are no matter)."""
    json_at = json.JSONDecoder().raw_decode
    for match in re.finditer(r"\{", answer):
        for read in (json_at, read_literal_at):
            try:
                value, _ = read(answer, match.start())
            except (ValueError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    raise Rejected("no JSON object in the answer")
