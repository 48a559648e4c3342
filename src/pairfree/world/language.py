"""Captions of the shapes world: vocabulary, a template realizer and the parser that reads
captions back.

One intermediate, :class:`ParsedScene`, sits between scenes and text. :func:`describe` picks
which facts of a scene a caption states, :func:`realize` writes those facts with varied
templates and synonyms, and :func:`parse_caption` reads any such text back into the same
facts. A paraphrase is ``realize(parse_caption(text))``; the truth metrics compare parses
with scenes.

Parsing rules (the templates are written to obey them):
- an object is a shape word; the size and color words since the previous object modify it;
  "the <color> <shape>" names an object already mentioned instead of adding one;
- a position phrase belongs to the last object of its clause, or to the next object when it
  opens the clause (clauses end at punctuation, "and" and "while");
- a relation links the last object before it to the first object after it;
- a number word ("two", "3") states the object count.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pairfree.world.scene import (
    COLORS,
    GRID,
    INVERSE,
    SHAPES,
    SIZES,
    Position,
    Scene,
    SceneObject,
    relation_holds,
    weighted_choice,
)

# The first word of each entry is canonical; the others are synonyms.
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "circle": ("circle", "disc", "disk"),
    "square": ("square", "box"),
    "triangle": ("triangle",),
    "star": ("star",),
    "cross": ("cross", "plus sign"),
    "diamond": ("diamond", "rhombus"),
    "hexagon": ("hexagon",),
    "heart": ("heart",),
    "pentagon": ("pentagon",),
    "crescent": ("crescent", "moon"),
}
COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson"),
    "green": ("green",),
    "blue": ("blue",),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange",),
    "white": ("white",),
    "pink": ("pink",),
    "cyan": ("cyan", "turquoise"),
    "brown": ("brown",),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "small": ("small", "little", "tiny"),
    "medium": ("medium", "medium sized", "mid sized"),
    "large": ("large", "big", "huge"),
}
# Full phrases for writing; the parser keys on what follows "in/at/on the".
POSITION_PHRASES: dict[Position, tuple[str, ...]] = {
    (0, 0): ("in the top left", "at the top left", "in the upper left", "in the top left corner"),
    (0, 1): ("at the top", "at the top center", "in the top middle", "at the upper middle"),
    (0, 2): (
        "in the top right",
        "at the top right",
        "in the upper right",
        "in the top right corner",
    ),
    (1, 0): ("on the left", "on the left side", "in the middle left", "at the center left"),
    (1, 1): ("in the center", "in the middle", "at the center", "in the centre"),
    (1, 2): ("on the right", "on the right side", "in the middle right", "at the center right"),
    (2, 0): (
        "in the bottom left",
        "at the bottom left",
        "in the lower left",
        "in the bottom left corner",
    ),
    (2, 1): (
        "at the bottom",
        "at the bottom center",
        "in the bottom middle",
        "at the lower middle",
    ),
    (2, 2): (
        "in the bottom right",
        "at the bottom right",
        "in the lower right",
        "in the bottom right corner",
    ),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_PARSE_ONLY_RELATIONS = {"on the left of": "left of", "on the right of": "right of"}
_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_COUNT_NOUNS = ("shapes", "objects")
_BOUNDARIES = frozenset({",", ";", ":", ".", "and", "while"})
_DETERMINERS = frozenset({"a", "an", "one", "the", "another"})
_TOKEN = re.compile(r"[a-z]+|\d+|[,;:.]")


def _tokenize(text: str) -> list[str]:
    return _TOKEN.findall(text.lower().replace("-", " "))


def _build_lexicon() -> dict[tuple[str, ...], tuple[str, Any]]:
    entries: list[tuple[str, str, Any]] = []
    for kind, table in (("shape", SHAPE_WORDS), ("color", COLOR_WORDS), ("size", SIZE_WORDS)):
        entries += [(phrase, kind, concept) for concept, forms in table.items() for phrase in forms]
    for pos, phrases in POSITION_PHRASES.items():
        entries += [(phrase.split(" ", 2)[2], "position", pos) for phrase in phrases]
    for rel, phrases in RELATION_PHRASES.items():
        entries += [(phrase, "relation", rel) for phrase in phrases]
    entries += [(phrase, "relation", rel) for phrase, rel in _PARSE_ONLY_RELATIONS.items()]
    entries += [(word, "count", n) for n, word in enumerate(_NUMBERS) if n >= 2]
    entries += [(str(n), "count", n) for n in range(2, 10)]
    lexicon: dict[tuple[str, ...], tuple[str, Any]] = {}
    for phrase, kind, value in entries:
        key = tuple(_tokenize(phrase))
        if lexicon.get(key, (kind, value)) != (kind, value):
            raise AssertionError(f"ambiguous world phrase {phrase!r}")
        lexicon[key] = (kind, value)
    return lexicon


_LEXICON = _build_lexicon()
_MAX_PHRASE = max(len(k) for k in _LEXICON)

if (
    set(SHAPE_WORDS) != set(SHAPES)
    or set(COLOR_WORDS) != set(COLORS)
    or set(SIZE_WORDS) != set(SIZES)
):
    raise AssertionError("the world's word tables must cover its shapes, colors and sizes")


def surface_forms(concept: str) -> tuple[str, ...]:
    """Every phrase that names a shape, color or size concept (e.g. 'crescent' -> 'moon')."""
    for table in (SHAPE_WORDS, COLOR_WORDS, SIZE_WORDS):
        if concept in table:
            return table[concept]
    raise KeyError(f"{concept!r} is not a shape, color or size of the world")


@dataclass(frozen=True)
class ParsedObject:
    """One mentioned object; attributes the text does not state are None."""

    shape: str
    color: str | None = None
    size: str | None = None
    position: Position | None = None

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.shape, self.color)


Relation = tuple[int, str, int]  # (subject index, relation, object index)


@dataclass(frozen=True)
class ParsedScene:
    """What a caption states: objects in order of first mention, relations, a count."""

    objects: tuple[ParsedObject, ...] = ()
    relations: tuple[Relation, ...] = ()
    count: int | None = None

    def facts(self) -> frozenset[tuple]:
        """The stated facts, independent of wording and order (relations in left-of/above form)."""
        out: set[tuple] = set()
        for o in self.objects:
            out.add(("object", o.key))
            if o.size is not None:
                out.add(("size", o.key, o.size))
            if o.position is not None:
                out.add(("position", o.key, o.position))
        for a, rel, b in self.relations:
            ka, kb = self.objects[a].key, self.objects[b].key
            if rel in ("right of", "below"):
                ka, rel, kb = kb, INVERSE[rel], ka
            out.add(("relation", ka, rel, kb))
        return frozenset(out)


class _Mention:
    def __init__(self, shape: str, color: str | None, size: str | None) -> None:
        self.shape, self.color, self.size = shape, color, size
        self.position: Position | None = None

    def freeze(self) -> ParsedObject:
        return ParsedObject(self.shape, self.color, self.size, self.position)


def parse_caption(text: str) -> ParsedScene:
    """Read a caption back into the objects, attributes and relations it states.

    Words outside the world's vocabulary are skipped, so any text parses; text that names no
    object gives an empty :class:`ParsedScene`.
    """
    tokens = _tokenize(text)
    mentions: list[_Mention] = []
    relations: list[Relation] = []
    count: int | None = None
    modifiers: dict[str, str] = {}
    determiner: str | None = None
    last: int | None = None  # most recent object anywhere
    clause_last: int | None = None  # most recent object in the current clause
    pending_position: Position | None = None
    pending_relation: tuple[int, str] | None = None

    i = 0
    while i < len(tokens):
        length, entry = 1, None
        for n in range(min(_MAX_PHRASE, len(tokens) - i), 0, -1):
            if (entry := _LEXICON.get(tuple(tokens[i : i + n]))) is not None:
                length = n
                break
        word = tokens[i]
        i += length
        if entry is None:
            if word in _BOUNDARIES:
                clause_last, modifiers, determiner = None, {}, None
            elif word in _DETERMINERS:
                determiner = word
            continue
        kind, value = entry
        if kind in ("size", "color"):
            modifiers[kind] = value
        elif kind == "shape":
            color, size = modifiers.get("color"), modifiers.get("size")
            index = None
            if determiner == "the":
                index = next(
                    (
                        k
                        for k, m in enumerate(mentions)
                        if m.shape == value and m.color == color and size in (None, m.size)
                    ),
                    None,
                )
            if index is None:
                mentions.append(_Mention(value, color, size))
                index = len(mentions) - 1
            if pending_position is not None and mentions[index].position is None:
                mentions[index].position = pending_position
                pending_position = None
            if pending_relation is not None and pending_relation[0] != index:
                relations.append((pending_relation[0], pending_relation[1], index))
            pending_relation = None
            last = clause_last = index
            modifiers, determiner = {}, None
        elif kind == "position":
            if clause_last is not None and mentions[clause_last].position is None:
                mentions[clause_last].position = value
            else:
                pending_position = value
            determiner = None
        elif kind == "relation":
            pending_relation = (last, value) if last is not None else None
            determiner = None
        elif count is None:
            count = value
    unique = tuple(dict.fromkeys(relations))
    return ParsedScene(tuple(m.freeze() for m in mentions), unique, count)


@dataclass(frozen=True)
class Phrasing:
    """How a world talks: which facts its captions state, and with which templates and words."""

    p_size: float = 0.75  # multi-object captions: chance that an object's size is stated
    p_relational: float = 0.35  # multi-object captions: relations instead of absolute cells
    p_position_in_relational: float = 0.25
    p_count: float = 0.2
    p_clauses: float = 0.3  # one clause per object ("in the top left there is ...")
    p_synonym: float = 0.3
    reading_order: bool = False  # list objects top-left to bottom-right instead of at random
    intros: tuple[str, ...] = ("", "there {be} ", "the image shows ", "a picture of ", "we see ")
    count_intros: tuple[str, ...] = ("{n} {noun}: ", "there are {n} {noun}: ")
    sentence_case: bool = False  # capital first letter and a final period
    # partial views: weights of naming 1, 2, 3, ... objects, drawn without replacement in
    # proportion to salience ** salience_power; empty = every object is named
    mentions: tuple[float, ...] = ()
    salience_power: float = 1.0
    p_position: float = 1.0  # partial views, no relations: chance that an object's cell is stated

    def __post_init__(self) -> None:
        if self.mentions and (not all(w >= 0 for w in self.mentions) or not sum(self.mentions) > 0):
            raise ValueError(f"Phrasing.mentions must be weights >= 0, got {self.mentions}")
        if self.mentions and self.p_count:
            raise ValueError("Phrasing: a caption naming a few objects cannot state the count")
        if not self.salience_power >= 0:
            raise ValueError(f"Phrasing.salience_power must be >= 0, got {self.salience_power}")
        probabilities = ("p_size", "p_relational", "p_position_in_relational", "p_count")
        for name in (*probabilities, "p_clauses", "p_synonym", "p_position"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(
                    f"Phrasing.{name} must be a probability, got {getattr(self, name)}"
                )
        if not self.intros or not self.count_intros:
            raise ValueError("Phrasing needs at least one intro and one count intro")


def named_objects(scene: Scene, rng: np.random.Generator, phrasing: Phrasing) -> list[int]:
    """The objects one caption names: all of them, or with ``phrasing.mentions`` a few drawn
    by salience (as annotators name what catches the eye), in scene order."""
    n = len(scene.objects)
    if not phrasing.mentions:
        return list(range(n))
    weights = {k + 1: w for k, w in enumerate(phrasing.mentions[:n]) if w > 0}
    m = weighted_choice(rng, weights) if weights else n
    salience = np.asarray(scene.salience if scene.salience is not None else [1.0] * n)
    p = salience**phrasing.salience_power + 1e-9
    chosen = rng.choice(n, size=m, replace=False, p=p / p.sum())
    return sorted(int(i) for i in chosen)


def describe(scene: Scene, rng: np.random.Generator, phrasing: Phrasing) -> ParsedScene:
    """Choose the facts one caption of ``scene`` states.

    Every named object (:func:`named_objects`) gets its shape and color. When every object is
    named, a single object also gets its size and cell, so its caption identifies the scene,
    and several objects get their cells, or relations that chain them all together; a partial
    view states each cell with probability ``p_position`` instead. Sizes are stated with
    probability ``p_size``. Whether to state the count is left to :func:`realize`.
    """
    if not scene.objects:
        raise ValueError("an empty scene has no caption")
    if phrasing.mentions:
        scene = Scene(tuple(scene.objects[i] for i in named_objects(scene, rng, phrasing)))
    n = len(scene.objects)
    whole = not phrasing.mentions  # a caption of every object states every cell
    relational = n >= 2 and rng.random() < phrasing.p_relational

    def stated_position(o: SceneObject) -> Position | None:
        if relational:
            keep = rng.random() < phrasing.p_position_in_relational
        else:
            keep = whole or rng.random() < phrasing.p_position
        return o.position if keep else None

    objects = tuple(
        ParsedObject(
            o.shape,
            o.color,
            o.size if (n == 1 and whole) or rng.random() < phrasing.p_size else None,
            stated_position(o),
        )
        for o in scene.objects
    )
    relations: list[Relation] = []
    if relational:
        perm = [int(k) for k in rng.permutation(n)]
        for k in range(1, n):
            a = perm[k - 1] if rng.random() < 0.7 else perm[int(rng.integers(k))]
            b = perm[k]
            pa, pb = scene.objects[a].position, scene.objects[b].position
            rel = _pick(rng, [r for r in RELATION_PHRASES if relation_holds(pa, r, pb)])
            relations.append((a, rel, b) if rng.random() < 0.5 else (b, INVERSE[rel], a))
    return ParsedScene(objects, tuple(relations))


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _word(rng: np.random.Generator, forms: Sequence[str], p_synonym: float) -> str:
    # draw the same random numbers whatever the word, so that captions of two scenes that
    # differ only in attributes (e.g. swapped colors) keep the same template
    use_synonym = rng.random() < p_synonym
    index = int(rng.integers(max(1, len(forms) - 1)))
    return forms[1 + index] if use_synonym and len(forms) > 1 else forms[0]


def _join(parts: Sequence[str]) -> str:
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


class _Writer:
    """Writes the noun and position phrases of one caption."""

    def __init__(self, parsed: ParsedScene, rng: np.random.Generator, phrasing: Phrasing):
        self.objects, self.rng, self.phrasing = parsed.objects, rng, phrasing
        self.mentioned: set[int] = set()

    def word(self, table: Mapping[str, tuple[str, ...]], concept: str) -> str:
        return _word(self.rng, table[concept], self.phrasing.p_synonym)

    def noun(self, i: int, *, with_position: bool = True) -> str:
        """'a large red circle in the top left' the first time, 'the red circle' afterwards."""
        o = self.objects[i]
        if i in self.mentioned:
            words = [self.word(COLOR_WORDS, o.color)] if o.color else []
            return " ".join(["the", *words, self.word(SHAPE_WORDS, o.shape)])
        self.mentioned.add(i)
        words = [self.word(SIZE_WORDS, o.size)] if o.size else []
        words += [self.word(COLOR_WORDS, o.color)] if o.color else []
        words.append(self.word(SHAPE_WORDS, o.shape))
        article = "an" if words[0][0] in "aeiou" else "a"
        phrase = " ".join([article, *words])
        if with_position and o.position is not None:
            phrase += " " + self.position(o.position)
        return phrase

    def position(self, pos: Position) -> str:
        return _word(self.rng, POSITION_PHRASES[pos], self.phrasing.p_synonym)

    def order(self) -> list[int]:
        if self.phrasing.reading_order:
            far = (GRID, 0)
            return sorted(range(len(self.objects)), key=lambda i: self.objects[i].position or far)
        return [int(i) for i in self.rng.permutation(len(self.objects))]


def _listing(w: _Writer) -> str:
    return _join([w.noun(i) for i in w.order()])


def _clauses(w: _Writer) -> str:
    parts = []
    for i in w.order():
        pos = w.objects[i].position
        if pos is None:
            parts.append(f"there is {w.noun(i)}")
            continue
        noun, where = w.noun(i, with_position=False), w.position(pos)
        template = _pick(w.rng, ("{p} there is {n}", "{n} is {p}", "{p} is {n}", "{n} sits {p}"))
        parts.append(template.format(p=where, n=noun))
    return _join(parts)


def _relational(w: _Writer, relations: Sequence[Relation]) -> tuple[str, bool]:
    """Relation clauses, chained with 'which is' where they share an object; the flag says
    whether the text starts with a bare noun phrase (so an intro may go in front)."""
    text, previous, bare_start = "", None, False
    for a, rel, b in relations:
        phrase = _word(w.rng, RELATION_PHRASES[rel], w.phrasing.p_synonym)
        if text and a == previous:
            text += f", which is {phrase} {w.noun(b)}"
        else:
            first_mention = a not in w.mentioned
            subject = w.noun(a)
            bare = first_mention and w.objects[a].position is None and w.rng.random() < 0.5
            if not text:
                bare_start = bare
            else:
                text += _pick(w.rng, (", and ", "; "))
            text += f"{subject} {phrase if bare else 'is ' + phrase} {w.noun(b)}"
        previous = b
    for i in w.order():
        if i not in w.mentioned:
            text += f", and there is {w.noun(i)}"
    return text, bare_start


def realize(parsed: ParsedScene, rng: np.random.Generator, phrasing: Phrasing) -> str:
    """Write one caption that states exactly the facts of ``parsed`` (and a count if it has
    one, or at random when it names several objects)."""
    n = len(parsed.objects)
    if n == 0:
        raise ValueError("nothing to write: the parsed scene names no object")
    count = parsed.count
    if count is None and n >= 2 and rng.random() < phrasing.p_count:
        count = n
    w = _Writer(parsed, rng, phrasing)
    be = "is" if n == 1 else "are"
    if parsed.relations:
        body, intro_ok = _relational(w, parsed.relations)
        be = "is"
    elif rng.random() < phrasing.p_clauses:
        body, intro_ok = _clauses(w), False
    else:
        body, intro_ok = _listing(w), True
    if count is not None:
        noun = _pick(rng, _COUNT_NOUNS)
        body = _pick(rng, phrasing.count_intros).format(n=_NUMBERS[count], noun=noun) + body
    elif intro_ok:
        body = _pick(rng, phrasing.intros).format(be=be) + body
    if phrasing.sentence_case:
        body = body[0].upper() + body[1:] + "."
    return body


def caption_scene(scene: Scene, rng: np.random.Generator, phrasing: Phrasing) -> str:
    """One true caption of ``scene``."""
    return realize(describe(scene, rng, phrasing), rng, phrasing)


def reference_captions(
    scene: Scene, rng: np.random.Generator, phrasing: Phrasing, n: int
) -> list[str]:
    """``n`` different true captions of ``scene`` (fewer only if the phrasing cannot vary)."""
    captions: list[str] = []
    for _ in range(20 * n):
        caption = caption_scene(scene, rng, phrasing)
        if caption not in captions:
            captions.append(caption)
            if len(captions) == n:
                break
    return captions
