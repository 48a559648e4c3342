"""A small reader of Python and JSON literals, for LLM answers that are one or the other.

ICSD's code ``eval()``s every answer; ``ast.literal_eval`` would not run code, but compiling a
crafted answer can still exhaust the C stack or memory. This reader takes exactly the literal
forms an answer uses - dicts, lists, tuples, sets, strings (single, double or triple quoted,
with Python's escapes and adjacent strings joined), numbers, ``True``/``False``/``None`` and
JSON's ``true``/``false``/``null`` - with a nesting limit, and builds the same values Python
would. Anything else is a :class:`ValueError` naming where it stopped.
"""

from __future__ import annotations

import re
import string

MAX_DEPTH = 32
_NUMBER = re.compile(r"[+-]?(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?")
_NAME = re.compile(r"[A-Za-z_]\w*")
_NAMES = {"True": True, "False": False, "None": None, "true": True, "false": False, "null": None}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "a": "\a",
            "0": "\0", "\\": "\\", "'": "'", '"': '"', "\n": "", "/": "/"}  # fmt: skip
_CLOSE = {"{": "}", "[": "]", "(": ")"}


def read_literal(text: str) -> object:
    """The value of ``text``, a single literal (surrounding whitespace allowed)."""
    value, end = read_literal_at(text, 0)
    if text[end:].strip():
        raise ValueError(f"text after the literal at character {end}")
    return value


def read_literal_at(text: str, start: int) -> tuple[object, int]:
    """The literal that begins at ``start`` in ``text``, and where it ends (what follows is
    not read)."""
    reader = _Reader(text)
    reader.pos = start
    return reader.value(0), reader.pos


class _Reader:
    def __init__(self, text: str) -> None:
        self.text, self.pos = text, 0

    def error(self, what: str) -> ValueError:
        return ValueError(f"{what} at character {self.pos}")

    def skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\r\n":
            self.pos += 1

    def peek(self) -> str:
        self.skip_space()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def value(self, depth: int) -> object:
        if depth > MAX_DEPTH:
            raise self.error(f"nested deeper than {MAX_DEPTH}")
        char = self.peek()
        if char in _CLOSE:
            return self.container(char, depth)
        if char in "'\"":
            parts = []
            while self.peek() in ("'", '"'):  # adjacent strings join, as in Python
                parts.append(self.string())
            return "".join(parts)
        match = _NUMBER.match(self.text, self.pos)
        if match:
            self.pos = match.end()
            token = match.group().replace("_", "")
            return float(token) if any(c in token for c in ".eE") else int(token)
        name = _NAME.match(self.text, self.pos)
        if name and name.group() in _NAMES:
            self.pos = name.end()
            return _NAMES[name.group()]
        raise self.error("not a literal")

    def container(self, opening: str, depth: int) -> object:
        self.pos += 1
        closing, items, pairs = _CLOSE[opening], [], []
        is_dict, trailing_comma = None, False
        while self.peek() != closing:
            if not self.peek():
                raise self.error(f"no closing {closing!r}")
            item = self.value(depth + 1)
            if opening == "{" and is_dict is None:
                is_dict = self.peek() == ":"
            if is_dict:
                if self.peek() != ":":
                    raise self.error("a dict entry without ':'")
                self.pos += 1
                pairs.append((item, self.value(depth + 1)))
            else:
                items.append(item)
            trailing_comma = self.peek() == ","
            if trailing_comma:
                self.pos += 1
            elif self.peek() != closing:
                raise self.error(f"expected ',' or {closing!r}")
        self.pos += 1
        try:
            if opening == "{":
                return dict(pairs) if is_dict or not items else set(items)
        except TypeError:  # an unhashable key, as Python refuses it
            raise self.error("an unhashable key") from None
        if opening == "(" and len(items) == 1 and not trailing_comma:
            return items[0]  # parentheses around one value
        return items if opening == "[" else tuple(items)

    def string(self) -> str:
        self.skip_space()
        quote = self.text[self.pos]
        if self.text.startswith(quote * 3, self.pos):
            quote *= 3
        self.pos += len(quote)
        out = []
        while not self.text.startswith(quote, self.pos):
            if self.pos >= len(self.text) or (len(quote) == 1 and self.text[self.pos] == "\n"):
                raise self.error("an unterminated string")
            char = self.text[self.pos]
            if char == "\\":
                out.append(self.escape())
                continue
            out.append(char)
            self.pos += 1
        self.pos += len(quote)
        return "".join(out)

    def escape(self) -> str:
        code = self.text[self.pos + 1 : self.pos + 2]
        width = {"x": 2, "u": 4, "U": 8}.get(code)
        if width:
            digits = self.text[self.pos + 2 : self.pos + 2 + width]
            if len(digits) != width or not all(c in string.hexdigits for c in digits):
                raise self.error(f"a bad \\{code} escape")
            self.pos += 2 + width
            return chr(int(digits, 16))
        self.pos += 2
        return _ESCAPES.get(code, "\\" + code)  # an unknown escape stays as written
