"""Scenes of the shapes world: the ground truth every image and caption is made from.

A scene holds up to nine objects on a 3x3 grid, one per cell, each with a shape, a color and
a size. Pairwise relations are not stored: they follow from the cells, so a scene can never
contradict itself. No two objects share a (shape, color) pair, which keeps every object
nameable by "the <color> <shape>" and makes truth matching one-to-one.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    canvas is what the world's text-to-image model draws for a prompt it cannot read)."""

    objects: tuple[SceneObject, ...]

    def __post_init__(self) -> None:
        cells = [o.position for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a cell: {cells}")
        keys = [o.key for o in self.objects]
        if len(set(keys)) != len(keys):
            raise ValueError(f"two objects share a (shape, color) pair: {keys}")

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
        return {"objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scene:
        objects = d.get("objects") if isinstance(d, Mapping) else None
        if not isinstance(objects, list):
            raise ValueError("a scene must be a mapping with an 'objects' list")
        return cls(tuple(SceneObject.from_dict(o) for o in objects))


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
