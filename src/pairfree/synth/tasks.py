"""The two LLM tasks of the synthetic-image recipes: their prompts and the parsing of answers.

- ``rephrase`` (SaCap): three rewordings of a caption, each at most 15 words, asked for as JSON
  ``{"1": ..., "2": ..., "3": ...}``; SaCap samples them with temperature 0.6, top-p 0.9.
- ``select-summarize`` (ICSD): from a numbered group of captions, the 5-10 that describe one
  scene consistently, and one objective summary of at most 50 words, asked for as
  ``{'index': list, 'summary': str}``. As ICSD's code does, the number selected is not
  enforced (any non-empty set of distinct captions of the group is kept).

The default prompts are the originals' own wording (their exact text is part of what
reproduces their data); a file can replace either (``{caption}`` / ``{captions}`` mark where
the input goes). Parsing is tolerant of form (JSON inside prose, single quotes, trailing
commas) and strict about content (indices in range, word limits, no template placeholders
echoed back); an answer that fails gives the reason, for the rejects file, as the originals
drop such answers.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pairfree.errors import PairfreeError

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


class Rejected(ValueError):
    """An answer that cannot be used; the message says why."""


@dataclass(frozen=True)
class Selection:
    indices: list[int]  # 0-based positions in the group
    summary: str


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
    return template.format(caption=caption.strip().rstrip("."))


def summarize_prompt(captions: Sequence[str], template: str = SUMMARIZE_PROMPT) -> str:
    """ICSD numbers the captions ``<1> ... <2> ...``, each ending with a period."""
    numbered = "".join(
        f"<{i}> {c if c.endswith('.') else c + '.'} " for i, c in enumerate(captions, 1)
    )
    return template.format(captions=numbered)


def parse_rephrasings(answer: str) -> list[str]:
    """Three rewordings from an answer, or :class:`Rejected`."""
    obj = _first_object(answer)
    values = [obj.get(str(i), obj.get(i)) for i in range(1, REPHRASINGS + 1)]
    if any(not isinstance(v, str) for v in values):
        raise Rejected(f'expected string values for keys "1" to "{REPHRASINGS}"')
    texts = [" ".join(v.split()) for v in values]
    for text in texts:
        _check_text(text, REPHRASE_MAX_WORDS)
    return texts


def parse_selection(answer: str, group_size: int) -> Selection:
    """The selected captions (0-based) and the summary, or :class:`Rejected`."""
    obj = _first_object(answer)
    index, summary = obj.get("index"), obj.get("summary")
    if not isinstance(index, list) or not isinstance(summary, str):
        raise Rejected("expected {'index': list, 'summary': str}")
    try:
        chosen = [int(i) for i in index]
    except (TypeError, ValueError):
        raise Rejected(f"indices are not whole numbers: {index!r}") from None
    if any(not 1 <= i <= group_size for i in chosen):
        raise Rejected(f"indices outside 1..{group_size}: {chosen}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise Rejected(f"no captions, or repeated ones, selected: {chosen}")
    summary = " ".join(summary.split())
    _check_text(summary, SUMMARY_MAX_WORDS)
    return Selection([i - 1 for i in chosen], summary)


def _check_text(text: str, max_words: int) -> None:
    words = text.split()
    if not words:
        raise Rejected("an empty text")
    if text.lower().strip(" .") in _PLACEHOLDERS:
        raise Rejected(f"the prompt's placeholder {text!r} echoed back")
    if len(words) > max_words:
        raise Rejected(f"{len(words)} words, over the limit of {max_words}")


def _first_object(answer: str) -> dict:
    """The first ``{...}`` in ``answer`` that parses as JSON or as a Python literal."""
    for match in re.finditer(r"\{", answer):
        depth, end = 0, None
        for pos in range(match.start(), len(answer)):
            depth += {"{": 1, "}": -1}.get(answer[pos], 0)
            if depth == 0:
                end = pos + 1
                break
        if end is None:
            continue
        text = re.sub(r",\s*([}\]])", r"\1", answer[match.start() : end])  # trailing commas
        for parse in (json.loads, ast.literal_eval):
            try:
                value = parse(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                continue
            if isinstance(value, dict):
                return value
    raise Rejected("no JSON object in the answer")
