"""Draw scenes as RGB images.

Objects are polygons drawn on a canvas ``supersample`` times the output size and averaged
down in blocks (anti-aliasing), with per-object jitter (offset, scale, rotation, color) and
Gaussian pixel noise. The same code draws the world's synthetic style (no anti-aliasing, a striped
background, a tinted palette, outlines), so that images from the world's text-to-image model
differ from real renders the way Stable Diffusion images differ from photos.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from pairfree.world.scene import COLORS, CONTEXTS, GRID, SHAPES, SIZES, Scene

SIZE_RADIUS: dict[str, float] = {"small": 0.22, "medium": 0.32, "large": 0.42}  # of a cell
# a cluttered world's context is its background: dark enough that every color reads on it
CONTEXT_BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "night": (18, 22, 58),
    "garden": (26, 58, 30),
    "street": (62, 62, 66),
    "workshop": (62, 40, 24),
}
if set(CONTEXT_BACKGROUNDS) != set(CONTEXTS):
    raise AssertionError("every context of the world needs a background")


def _regular(n: int, phase: float = -90.0) -> np.ndarray:
    t = np.deg2rad(phase + 360.0 * np.arange(n) / n)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _star() -> np.ndarray:
    outer, inner = _regular(5), _regular(5, phase=-54.0) * 0.45
    return np.stack([outer, inner], axis=1).reshape(-1, 2)


def _cross(arm: float = 0.3, reach: float = 0.95) -> np.ndarray:
    a, r = arm, reach
    return np.array(
        [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a)]
        + [(-r, a), (-r, -a), (-a, -a)]
    )


def _heart() -> np.ndarray:
    t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    x = 16.0 * np.sin(t) ** 3
    y = -(13.0 * np.cos(t) - 5.0 * np.cos(2 * t) - 2.0 * np.cos(3 * t) - np.cos(4 * t))
    return np.stack([x, y], axis=1)


def _crescent(offset: float = 0.45, inner: float = 0.85) -> np.ndarray:
    """The unit disc minus a disc of radius ``inner`` shifted right by ``offset``."""
    x = (1.0 + offset**2 - inner**2) / (2.0 * offset)
    alpha = np.arccos(x)
    phi = np.arctan2(np.sqrt(1.0 - x**2), x - offset)
    outer_t = np.linspace(alpha, 2.0 * np.pi - alpha, 32)
    inner_t = np.linspace(2.0 * np.pi - phi, phi, 24)
    outer_arc = np.stack([np.cos(outer_t), np.sin(outer_t)], axis=1)
    inner_arc = np.stack([offset + inner * np.cos(inner_t), inner * np.sin(inner_t)], axis=1)
    return np.concatenate([outer_arc, inner_arc])


def _unit(points: np.ndarray) -> np.ndarray:
    """Center the bounding box on the origin and scale every vertex into the unit disc."""
    points = points - (points.min(axis=0) + points.max(axis=0)) / 2.0
    return points / np.linalg.norm(points, axis=1).max()


UNIT_SHAPES: dict[str, np.ndarray] = {
    "circle": _regular(48),
    "square": _regular(4, phase=-45.0),
    "triangle": _unit(_regular(3)),
    "star": _star(),
    "cross": _cross(),
    "diamond": np.array([(0.0, -1.0), (0.62, 0.0), (0.0, 1.0), (-0.62, 0.0)]),
    "hexagon": _regular(6, phase=0.0),
    "heart": _unit(_heart()),
    "pentagon": _unit(_regular(5)),
    "crescent": _unit(_crescent()),
}
if set(UNIT_SHAPES) != set(SHAPES):
    raise AssertionError("every shape of the world needs a polygon")


@dataclass(frozen=True)
class RenderStyle:
    """How scenes are drawn; jitter and radii are fractions of a grid cell.

    ``radii`` are the small, medium and large objects' radii; only with ``overlap`` may a large
    one reach past its cell into a neighbour's (a cluttered world's occlusion).
    """

    supersample: int = 4  # 1 draws at the output size: hard, aliased edges
    background: tuple[int, int, int] = (28, 28, 32)
    stripes: int = 0  # amplitude of diagonal background stripes; 0 = flat background
    tint: tuple[int, int, int] = (255, 255, 255)
    tint_strength: float = 0.0  # blend of every object color toward ``tint``
    outline: int = 0  # width in output pixels of a darker outline around each object
    jitter: float = 0.05  # largest offset of an object from its cell center
    scale_jitter: float = 0.06  # largest relative change of an object's radius
    rotation: float = 10.0  # largest rotation in degrees
    color_jitter: int = 12  # largest change of each color channel
    noise: float = 3.0  # std of Gaussian pixel noise
    radii: tuple[float, float, float] = tuple(SIZE_RADIUS[s] for s in SIZES)
    overlap: bool = False

    def __post_init__(self) -> None:
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if len(self.radii) != len(SIZES) or not all(0 < r <= 1.0 for r in self.radii):
            raise ValueError(f"radii must be {len(SIZES)} values in (0, 1], got {self.radii}")
        reach = max(self.radii) * (1.0 + self.scale_jitter) + self.jitter
        if reach >= 0.5 and not self.overlap:
            raise ValueError(
                f"jitter {self.jitter} and scale_jitter {self.scale_jitter} let large objects "
                "reach past their cell and overlap a neighbour"
            )
        if not 0.0 <= self.tint_strength <= 1.0:
            raise ValueError(f"tint_strength must be in [0, 1], got {self.tint_strength}")


REAL_STYLE = RenderStyle()
SYNTHETIC_STYLE = RenderStyle(
    supersample=1,
    background=(72, 60, 50),
    stripes=18,
    tint=(255, 200, 120),
    tint_strength=0.3,
    outline=1,
    color_jitter=0,
    noise=0.0,
)


@dataclass(frozen=True)
class Placement:
    """Where and how one object is drawn, in output pixels."""

    center: tuple[float, float]  # (x, y)
    radius: float
    angle: float  # degrees
    rgb: tuple[int, int, int]


def place_objects(
    scene: Scene, rng: np.random.Generator, *, size: int, style: RenderStyle
) -> list[Placement]:
    """Jittered placements; no object reaches past its own cell unless the style allows
    overlap."""
    cell = size / GRID
    radius = dict(zip(SIZES, style.radii, strict=True))
    tint = np.array(style.tint, dtype=np.float64)
    placements = []
    for o in scene.objects:
        dx, dy, ds, rot = rng.uniform(-1.0, 1.0, size=4)
        color = np.array(COLORS[o.color], dtype=np.float64)
        color += rng.integers(-style.color_jitter, style.color_jitter + 1, size=3)
        color = (1.0 - style.tint_strength) * color + style.tint_strength * tint
        row, col = o.position
        placements.append(
            Placement(
                center=(
                    (col + 0.5 + style.jitter * dx) * cell,
                    (row + 0.5 + style.jitter * dy) * cell,
                ),
                radius=radius[o.size] * (1.0 + style.scale_jitter * ds) * cell,
                angle=style.rotation * rot,
                rgb=tuple(int(c) for c in np.clip(np.rint(color), 0, 255)),
            )
        )
    return placements


def _polygon(shape: str, p: Placement) -> np.ndarray:
    t = np.deg2rad(p.angle)
    rotation = np.array([[np.cos(t), np.sin(t)], [-np.sin(t), np.cos(t)]])
    return UNIT_SHAPES[shape] @ rotation * p.radius + p.center


@lru_cache(maxsize=16)
def _background(style: RenderStyle, canvas: int, context: str | None) -> np.ndarray:
    image = np.empty((canvas, canvas, 3), dtype=np.int16)
    image[:] = style.background if context is None else CONTEXT_BACKGROUNDS[context]
    if style.stripes:
        period = 6 * style.supersample
        diagonal = np.add.outer(np.arange(canvas), np.arange(canvas))
        sign = np.where((diagonal // (period // 2)) % 2 == 0, 1, -1)
        image += (style.stripes * sign)[:, :, None].astype(np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def render_scene(
    scene: Scene, rng: np.random.Generator, *, size: int = 64, style: RenderStyle = REAL_STYLE
) -> Image.Image:
    """Draw ``scene`` as a ``size`` x ``size`` RGB image; ``rng`` drives jitter and noise."""
    ss = style.supersample
    canvas = Image.fromarray(_background(style, size * ss, scene.context))
    draw = ImageDraw.Draw(canvas)
    for o, p in zip(scene.objects, place_objects(scene, rng, size=size, style=style), strict=True):
        points = _polygon(o.shape, p) * ss
        outline = tuple(c * 45 // 100 for c in p.rgb) if style.outline else None
        draw.polygon(points.ravel().tolist(), fill=p.rgb, outline=outline, width=style.outline * ss)
    if ss > 1:
        canvas = canvas.reduce(ss)
    if style.noise <= 0:
        return canvas
    pixels = np.asarray(canvas, dtype=np.float32)
    pixels = pixels + style.noise * rng.standard_normal(pixels.shape, dtype=np.float32)
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))


def salience(scene: Scene, style: RenderStyle, *, size: int = 48) -> tuple[float, ...]:
    """How much each object draws the eye: the share of the image it shows once later objects
    have covered it, times its centrality (1 in the center cell, 0.75 beside it, 0.5 in a
    corner). Read from an unjittered drawing, so it is a property of the scene."""
    calm = RenderStyle(jitter=0.0, scale_jitter=0.0, rotation=0.0, color_jitter=0, noise=0.0,
                       radii=style.radii, overlap=True)  # fmt: skip
    placements = place_objects(scene, np.random.default_rng(0), size=size, style=calm)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for k, (o, p) in enumerate(zip(scene.objects, placements, strict=True)):
        draw.polygon(_polygon(o.shape, p).ravel().tolist(), fill=k + 1)
    shown = np.bincount(np.asarray(mask).ravel(), minlength=len(scene.objects) + 1)[1:]
    centre = GRID // 2
    return tuple(
        round(
            float(shown[k])
            / size**2
            * (1.0 - 0.25 * (abs(o.position[0] - centre) + abs(o.position[1] - centre))),
            5,
        )
        for k, o in enumerate(scene.objects)
    )
