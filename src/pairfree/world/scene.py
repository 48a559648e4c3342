"""Scenes of the shapes world: the ground truth every image and caption is made from.

A scene holds up to nine objects on a 3x3 grid, one per cell, each with a shape, a color and
a size. Pairwise relations are not stored: they follow from the cells, so a scene can never
contradict itself. No two objects share a (shape, color) pair, which keeps every object
nameable by "the <color> <shape>" and makes truth matching one-to-one.

A cluttered (COCO-like) world adds two things a scene may carry: the *context* it is set in
(a background that makes some shapes co-occur, as kitchens hold cups) and each object's
*salience* (how much of it shows, and how central it is), from which captions pick the few
objects they name and truth metrics take the salient objects a caption should name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = (
    "circle",
    "square",
    "triangle",
    "star",
    "cross",
    "diamond",
    "hexagon",
    "heart",
    "pentagon",
    "crescent",
)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (222, 46, 46),
    "green": (46, 170, 70),
    "blue": (50, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 30),
    "white": (240, 240, 240),
    "pink": (250, 140, 200),
    "cyan": (40, 215, 225),
    "brown": (150, 95, 45),
}
SIZES: tuple[str, ...] = ("small", "medium", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
INVERSE: dict[str, str] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
GRID = 3
CONTEXTS: tuple[str, ...] = ("night", "garden", "street", "workshop")
SALIENT_SHARE = 0.5  # salient: at least this share of the scene's most salient object

Position = tuple[int, int]  # (row, col); row 0 is the top, col 0 the left


def relation_holds(a: Position, relation: str, b: Position) -> bool:
    """Whether an object at ``a`` stands in ``relation`` to an object at ``b``."""
    if relation == "left of":
        return a[1] < b[1]
    if relation == "right of":
        return a[1] > b[1]
    if relation == "above":
        return a[0] < b[0]
    if relation == "below":
        return a[0] > b[0]
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    position: Position

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; expected one of {tuple(COLORS)}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        row, col = self.position
        if not (0 <= row < GRID and 0 <= col < GRID):
            raise ValueError(f"position {self.position} is outside the {GRID}x{GRID} grid")

    @property
    def key(self) -> tuple[str, str]:
        return (self.shape, self.color)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "position": list(self.position),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SceneObject:
        try:
            row, col = d["position"]
            return cls(str(d["shape"]), str(d["color"]), str(d["size"]), (int(row), int(col)))
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad scene object {dict(d)!r}: {e}") from e


@dataclass(frozen=True)
class Scene:
    """Objects in distinct cells with distinct (shape, color) pairs; may be empty (a blank
    canvas is what the world's text-to-image model draws for a prompt it cannot read).

    Objects are drawn in order, so a later one covers an earlier one where they overlap.
    ``context`` and ``salience`` (one value per object) are set by cluttered worlds only.
    """

    objects: tuple[SceneObject, ...]
    context: str | None = None
    salience: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        keys = [o.key for o in self.objects]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two objects share a (shape, color) pair: {keys}")
        if self.context is not None and self.context not in CONTEXTS:
            raise ValueError(f"unknown context {self.context!r}; expected one of {CONTEXTS}")
        if self.salience is not None and (
            len(self.salience) != len(self.objects)
            or not all(math.isfinite(s) and s >= 0 for s in self.salience)
        ):
            raise ValueError(
                f"salience {self.salience} must give one finite value >= 0 per object "
                f"({len(self.objects)})"
            )

    def salient_objects(self) -> tuple[int, ...]:
        """Indices of the objects a caption of the scene should name: those at least
        ``SALIENT_SHARE`` as salient as the most salient one (every object without salience)."""
        if self.salience is None or not self.objects:
            return tuple(range(len(self.objects)))
        top = max(self.salience)
        return tuple(i for i, s in enumerate(self.salience) if s >= SALIENT_SHARE * top)

    def relations(self) -> list[tuple[int, str, int]]:
        """Every true (i, relation, j) between two different objects."""
        return [
            (i, rel, j)
            for i, a in enumerate(self.objects)
            for j, b in enumerate(self.objects)
            if i != j
            for rel in RELATIONS
            if relation_holds(a.position, rel, b.position)
        ]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"objects": [o.to_dict() for o in self.objects]}
        if self.context is not None:
            out["context"] = self.context
        if self.salience is not None:
            out["salience"] = list(self.salience)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        objects = d.get("objects") if isinstance(d, Mapping) else None
        if not isinstance(objects, list):
            raise ValueError("a scene must be a mapping with an 'objects' list")
        salience = d.get("salience")
        if salience is not None:
            if not isinstance(salience, list) or not all(
                isinstance(s, int | float) and not isinstance(s, bool) for s in salience
            ):
                raise ValueError(f"a scene's salience must be a list of numbers, got {salience!r}")
            salience = tuple(float(s) for s in salience)
        context = d.get("context")
        if context is not None and not isinstance(context, str):
            raise ValueError(f"a scene's context must be a string, got {context!r}")
        return cls(tuple(SceneObject.from_dict(o) for o in objects), context, salience)


def weighted_choice(rng: np.random.Generator, weights: Mapping[Any, float]) -> Any:
    """One key of ``weights``, drawn with probability proportional to its weight."""
    keys = list(weights)
    cumulative = np.cumsum(np.fromiter(weights.values(), dtype=np.float64, count=len(keys)))
    return keys[int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))]


def sample_scene(
    rng: np.random.Generator,
    *,
    shapes: Mapping[str, float],
    colors: Mapping[str, float],
    sizes: Mapping[str, float],
    counts: Mapping[int, float],
) -> Scene:
    """Draw a scene: object count, distinct cells, then distinct (shape, color) pairs."""
    n = weighted_choice(rng, counts)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects: list[SceneObject] = []
    used: set[tuple[str, str]] = set()
    for cell in cells:
        key = (weighted_choice(rng, shapes), weighted_choice(rng, colors))
        while key in used:
            key = (weighted_choice(rng, shapes), weighted_choice(rng, colors))
        used.add(key)
        size = weighted_choice(rng, sizes)
        objects.append(SceneObject(key[0], key[1], size, divmod(int(cell), GRID)))
    return Scene(tuple(objects))


def sample_cluttered_scene(
    rng: np.random.Generator,
    *,
    shapes: Mapping[str, float],
    colors: Mapping[str, float],
    sizes: Mapping[str, float],
    counts: Mapping[int, float],
    context: str,
    concentration: float,
) -> Scene:
    """Draw a COCO-like scene: a count, then its objects (:func:`add_instances`)."""
    n = weighted_choice(rng, counts)
    objects = add_instances(rng, (), n, shapes=shapes, colors=colors, sizes=sizes,
                            concentration=concentration)  # fmt: skip
    return Scene(tuple(objects), context)


def add_instances(
    rng: np.random.Generator,
    objects: Sequence[SceneObject],
    n: int,
    *,
    shapes: Mapping[str, float],
    colors: Mapping[str, float],
    sizes: Mapping[str, float],
    concentration: float,
) -> list[SceneObject]:
    """``n`` new objects in free cells of a scene holding ``objects``: each either another
    instance of a shape already there (chosen in proportion to its instances) or, with weight
    ``concentration``, a new shape from ``shapes`` (a Chinese restaurant process: few
    categories with several instances each, as COCO's 7.7 instances of 3.5 categories).
    Instances of a shape differ in color; fewer come back when the grid or the colors run
    out."""
    taken = {o.position for o in objects}
    free = [divmod(k, GRID) for k in range(GRID * GRID) if divmod(k, GRID) not in taken]
    cells = rng.choice(len(free), size=min(n, len(free)), replace=False)
    instances: dict[str, list[str]] = {}
    for o in objects:
        instances.setdefault(o.shape, []).append(o.color)
    added: list[SceneObject] = []
    for cell in cells:
        fresh = {s: w for s, w in shapes.items() if s not in instances}
        crowded = {s: float(len(c)) for s, c in instances.items() if len(c) < len(colors)}
        if not fresh and not crowded:
            break
        new = bool(fresh) and rng.random() * (concentration + sum(crowded.values())) < concentration
        shape = weighted_choice(rng, fresh) if new or not crowded else weighted_choice(rng, crowded)
        used = instances.setdefault(shape, [])
        options = {c: w for c, w in colors.items() if c not in used}
        if not options:
            continue
        color = weighted_choice(rng, options)
        used.append(color)
        added.append(SceneObject(shape, color, weighted_choice(rng, sizes), free[int(cell)]))
    return added
