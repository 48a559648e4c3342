"""World configurations and the named presets.

- ``default``: the reference world (8 shapes, 8 colors, 1-3 objects).
- ``shifted``: its cross-domain partner, like COCO vs Flickr30k: the same words, other
  shape/color/size frequencies, more objects per scene and another phrasing style.
- ``novel``: a NoCaps-like split. Two shapes and two colors are held out: they never occur in
  training or validation images nor in the corpus, only in test images. An object is novel
  when its shape or its color is held out; a test image is ``in`` domain when it has no novel
  object, ``out`` when every object is novel and ``near`` otherwise (NoCaps: in = only COCO
  classes, near = COCO and novel classes, out = only novel classes).
- ``coco``: cluttered COCO-like scenes whose captions name a salient few objects (world v2).
- ``coco-shifted``: its cross-domain partner, as ``shifted`` is the default world's: other
  shape, color, size and context frequencies, fewer objects, and the shifted phrasing.
- ``coco-novel``: ``coco`` with the novel words held out, NoCaps-like: models trained on the
  ``coco`` corpus meet them in its test images only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from pairfree.errors import PairfreeError
from pairfree.world.language import Phrasing
from pairfree.world.render import REAL_STYLE, SYNTHETIC_STYLE, RenderStyle, salience
from pairfree.world.scene import (
    COLORS,
    CONTEXTS,
    GRID,
    SHAPES,
    SIZES,
    Scene,
    sample_cluttered_scene,
    sample_scene,
    weighted_choice,
)

BASE_SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond", "hexagon", "heart")
BASE_COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "pink")
NOVEL_WORDS = ("pentagon", "crescent", "cyan", "brown")


@dataclass(frozen=True)
class T2IFailures:
    """How often the world's text-to-image model makes Stable Diffusion's typical mistakes,
    as probabilities per image.

    SD loses objects of multi-object prompts, binds colors to the wrong object, adds objects
    nobody asked for, and fills whatever the prompt leaves open with the same default
    composition (low diversity). Those failures are why SaCap re-pairs captions with the
    images that fit them best and why ICSD's summaries are drawn instead of the captions, so
    the world's model makes them too, at these rates. ``T2IFailures.none()`` draws exactly what
    the prompt says, with unstated attributes from the world's distribution.
    """

    drop_object: float = 0.2  # a prompt with two or more objects loses one of them
    swap_colors: float = 0.15  # two objects exchange colors (a single object takes another)
    extra_object: float = 0.1  # an object the prompt did not ask for (the count is off)
    default_layout: float = 0.8  # unstated cells and sizes follow one default composition

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"T2IFailures.{name} must be a probability, got {value}")

    @classmethod
    def none(cls) -> T2IFailures:
        return cls(0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Clutter:
    """How a cluttered world fills its scenes (see :func:`sample_cluttered_scene`).

    ``contexts`` weighs the settings; ``affinity`` multiplies a shape's weight in a context
    (absent: 1), so each context has the shapes it is known for.
    """

    contexts: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CONTEXTS, 1.0))
    affinity: dict[str, dict[str, float]] = field(default_factory=dict)
    concentration: float = 2.0

    def __post_init__(self) -> None:
        for context in (*self.contexts, *self.affinity):
            if context not in CONTEXTS:
                raise ValueError(f"unknown context {context!r}; expected one of {CONTEXTS}")
        if not self.contexts or not all(w > 0 for w in self.contexts.values()):
            raise ValueError(f"Clutter.contexts needs positive weights, got {self.contexts}")
        for context, boosts in self.affinity.items():
            for shape, w in boosts.items():
                if shape not in SHAPES or not w > 0:
                    raise ValueError(f"Clutter.affinity[{context!r}]: bad entry {shape!r}: {w}")
        if not self.concentration > 0:
            raise ValueError(f"Clutter.concentration must be > 0, got {self.concentration}")


@dataclass
class WorldConfig:
    """Everything that defines a world: what scenes contain, how they look, how they are told.

    Weights are relative frequencies. ``held_out`` words (shapes or colors) are kept out of
    training images and the corpus and appear only in test images.
    """

    name: str = "default"
    shapes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BASE_SHAPES, 1.0))
    colors: dict[str, float] = field(default_factory=lambda: dict.fromkeys(BASE_COLORS, 1.0))
    sizes: dict[str, float] = field(default_factory=lambda: dict.fromkeys(SIZES, 1.0))
    object_counts: dict[int, float] = field(default_factory=lambda: {1: 0.4, 2: 0.35, 3: 0.25})
    held_out: tuple[str, ...] = ()
    phrasing: Phrasing = Phrasing()
    captions_per_image: int = 5
    image_size: int = 64
    render: RenderStyle = REAL_STYLE
    synthetic: RenderStyle = SYNTHETIC_STYLE  # the style of the world's text-to-image model
    t2i_failures: T2IFailures = field(default_factory=T2IFailures)  # and its mistakes
    clutter: Clutter | None = None  # COCO-like scenes (None: the sparse scenes above)

    def __post_init__(self) -> None:
        for what, weights, known in (
            ("shape", self.shapes, SHAPES),
            ("color", self.colors, tuple(COLORS)),
            ("size", self.sizes, SIZES),
            ("object count", self.object_counts, tuple(range(1, GRID * GRID + 1))),
        ):
            if not weights:
                raise ValueError(f"world {self.name!r}: no {what} weights given")
            for key, weight in weights.items():
                if key not in known:
                    raise ValueError(f"world {self.name!r}: unknown {what} {key!r}; known: {known}")
                if not weight > 0:
                    raise ValueError(f"world {self.name!r}: {what} {key!r} has weight {weight}")
        stray = set(self.held_out) - set(self.shapes) - set(self.colors)
        if stray:
            raise ValueError(f"world {self.name!r}: held-out words {sorted(stray)} are not in use")
        seen_shapes, seen_colors = self.seen(self.shapes), self.seen(self.colors)
        if len(seen_shapes) * len(seen_colors) < max(self.object_counts):
            raise ValueError(
                f"world {self.name!r}: {len(seen_shapes)} seen shapes x {len(seen_colors)} "
                f"seen colors cannot fill a scene of {max(self.object_counts)} distinct objects"
            )
        if self.image_size < 4 * GRID:
            raise ValueError(f"world {self.name!r}: image_size {self.image_size} is too small")
        if self.captions_per_image < 1:
            raise ValueError(f"world {self.name!r}: captions_per_image must be >= 1")

    def seen(self, weights: dict[str, float]) -> dict[str, float]:
        """``weights`` without the held-out words."""
        return {k: w for k, w in weights.items() if k not in self.held_out}

    def sample_scene(self, rng: np.random.Generator, *, include_held_out: bool = False) -> Scene:
        """A scene of this world; held-out words are only drawn when asked (test images)."""
        shapes, colors = self.shapes, self.colors
        if not include_held_out:
            shapes, colors = self.seen(shapes), self.seen(colors)
        if self.clutter is None:
            return sample_scene(
                rng, shapes=shapes, colors=colors, sizes=self.sizes, counts=self.object_counts
            )
        context = weighted_choice(rng, self.clutter.contexts)
        boosts = self.clutter.affinity.get(context, {})
        scene = sample_cluttered_scene(
            rng,
            shapes={s: w * boosts.get(s, 1.0) for s, w in shapes.items()},
            colors=colors,
            sizes=self.sizes,
            counts=self.object_counts,
            context=context,
            concentration=self.clutter.concentration,
        )
        return replace(scene, salience=salience(scene, self.render))

    def domain(self, scene: Scene) -> str:
        """'in', 'near' or 'out' (see the module docstring)."""
        novel = [o.shape in self.held_out or o.color in self.held_out for o in scene.objects]
        if not any(novel):
            return "in"
        return "out" if all(novel) else "near"


def _default() -> WorldConfig:
    return WorldConfig()


def _shifted() -> WorldConfig:
    return WorldConfig(
        name="shifted",
        shapes=SHIFTED_SHAPES,
        colors=SHIFTED_COLORS,
        sizes={"small": 2.0, "medium": 1.0, "large": 1.0},
        object_counts={1: 0.1, 2: 0.3, 3: 0.4, 4: 0.2},
        phrasing=Phrasing(
            p_size=0.5,
            p_relational=0.6,
            p_position_in_relational=0.4,
            p_count=0.5,
            p_clauses=0.5,
            p_synonym=0.6,
            reading_order=True,
            intros=SHIFTED_INTROS,
            count_intros=("a scene with {n} {noun}: ", "{n} {noun} are visible: "),
            sentence_case=True,
        ),
    )


def _novel() -> WorldConfig:
    # Novel words are drawn twice as often as the others in test images, so that near- and
    # out-of-domain test images are common.
    return WorldConfig(
        name="novel",
        shapes={**dict.fromkeys(BASE_SHAPES, 1.0), "pentagon": 2.0, "crescent": 2.0},
        colors={**dict.fromkeys(BASE_COLORS, 1.0), "cyan": 2.0, "brown": 2.0},
        held_out=NOVEL_WORDS,
    )


SHIFTED_SHAPES = dict(zip(BASE_SHAPES, (3.0, 1.0, 1.0, 3.0, 0.5, 0.5, 0.5, 2.0), strict=True))
SHIFTED_COLORS = dict(zip(BASE_COLORS, (0.5, 2.0, 0.5, 2.0, 1.0, 0.5, 2.0, 1.0), strict=True))
SHIFTED_INTROS = ("an image containing ", "this picture has ", "a drawing of ", "a view of ")


def _coco() -> WorldConfig:
    # Targets from MS COCO (Lin et al., ECCV 2014, section 5): 7.7 instances of 3.5 categories
    # per image on average, long-tailed; the 3x3 grid caps a scene at nine objects, so the
    # counts keep COCO's long tail below that cap (mean 5.6) and the concentration keeps its
    # ratio of instances to categories (about 2). Captions name two or three objects.
    return WorldConfig(
        name="coco",
        object_counts={
            1: 0.06,
            2: 0.08,
            3: 0.1,
            4: 0.11,
            5: 0.12,
            6: 0.13,
            7: 0.13,
            8: 0.14,
            9: 0.13,
        },  # fmt: skip
        sizes={"small": 1.5, "medium": 1.0, "large": 0.8},
        phrasing=Phrasing(
            p_size=0.25,
            p_relational=0.15,
            p_position_in_relational=0.0,
            p_count=0.0,
            p_clauses=0.15,
            mentions=(0.3, 0.45, 0.2, 0.05),
            salience_power=1.5,
            p_position=0.2,
        ),
        render=replace(REAL_STYLE, radii=(0.26, 0.42, 0.85), overlap=True),
        synthetic=replace(SYNTHETIC_STYLE, radii=(0.26, 0.42, 0.85), overlap=True),
        clutter=Clutter(
            affinity={
                "night": {"star": 4.0, "circle": 3.0, "diamond": 2.0},
                "garden": {"heart": 4.0, "triangle": 3.0, "cross": 2.0},
                "street": {"square": 4.0, "hexagon": 3.0, "triangle": 2.0},
                "workshop": {"cross": 4.0, "hexagon": 3.0, "square": 2.0},
            }
        ),
    )


def _coco_shifted() -> WorldConfig:
    # As Flickr30k is to COCO: the same vocabulary and kind of scene, other frequencies of
    # objects and settings, a little fewer objects, other caption habits (intros, synonyms,
    # sentence case, sizes stated more often, one more object named now and then).
    coco = _coco()
    return replace(
        coco,
        name="coco-shifted",
        shapes=SHIFTED_SHAPES,
        colors=SHIFTED_COLORS,
        sizes={"small": 1.0, "medium": 1.0, "large": 1.2},
        object_counts={
            1: 0.1,
            2: 0.14,
            3: 0.16,
            4: 0.15,
            5: 0.13,
            6: 0.11,
            7: 0.09,
            8: 0.07,
            9: 0.05,
        },
        phrasing=replace(
            coco.phrasing,
            p_size=0.5,
            p_synonym=0.6,
            intros=SHIFTED_INTROS,
            sentence_case=True,
            mentions=(0.2, 0.4, 0.3, 0.1),
        ),
        clutter=replace(
            coco.clutter, contexts={"night": 2.0, "garden": 0.5, "street": 2.0, "workshop": 0.5}
        ),
    )


def _coco_novel() -> WorldConfig:
    # As in ``novel``, the held-out words are drawn twice as often so that test images with
    # novel objects are common; the corpus and the training images never hold them.
    coco = _coco()
    return replace(
        coco,
        name="coco-novel",
        shapes={**coco.shapes, "pentagon": 2.0, "crescent": 2.0},
        colors={**coco.colors, "cyan": 2.0, "brown": 2.0},
        held_out=NOVEL_WORDS,
    )


PRESETS: dict[str, Callable[[], WorldConfig]] = {
    "default": _default,
    "shifted": _shifted,
    "novel": _novel,
    "coco": _coco,
    "coco-shifted": _coco_shifted,
    "coco-novel": _coco_novel,
}


def world_preset(name: str) -> WorldConfig:
    """A fresh :class:`WorldConfig` for a named preset."""
    if name not in PRESETS:
        raise PairfreeError(f"unknown world preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
