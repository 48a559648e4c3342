"""The shapes world: a procedural benchmark in which the truth of every image is known.

Scenes of 1-3 colored shapes on a 3x3 grid are rendered to small images and described by
templated captions; a parser reads captions back, so generated captions can be scored by
what they claim (see DESIGN.md section 5).
"""

from pairfree.world.export import WorldPaths, load_scenes, make_world
from pairfree.world.language import (
    ParsedObject,
    ParsedScene,
    Phrasing,
    caption_scene,
    parse_caption,
    realize,
    reference_captions,
)
from pairfree.world.render import RenderStyle, render_scene
from pairfree.world.scene import Scene, SceneObject
from pairfree.world.synth import Summary, WorldParaphraser, WorldSummarizer, WorldTextToImage
from pairfree.world.truth import is_true, truth_metrics
from pairfree.world.variants import WorldConfig, world_preset

__all__ = [
    "ParsedObject",
    "ParsedScene",
    "Phrasing",
    "RenderStyle",
    "Scene",
    "SceneObject",
    "Summary",
    "WorldConfig",
    "WorldParaphraser",
    "WorldPaths",
    "WorldSummarizer",
    "WorldTextToImage",
    "caption_scene",
    "is_true",
    "load_scenes",
    "make_world",
    "parse_caption",
    "realize",
    "reference_captions",
    "render_scene",
    "truth_metrics",
    "world_preset",
]
