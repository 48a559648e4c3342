"""The world's stand-ins for a text-to-image model and an LLM, used by SaCap and ICSD.

- :class:`WorldTextToImage` parses a prompt back into a scene, fills in what the prompt
  leaves open, makes Stable Diffusion's typical mistakes at the rates of
  :class:`~pairfree.world.variants.T2IFailures` (an object dropped, colors bound to the wrong
  object, an extra object, one default composition for what the prompt leaves open) and draws
  the result in the synthetic style, so its images carry a style shift as SD images do. In a
  cluttered world it also sets the scene in a context and fills it with other objects
  behind the named ones, as SD draws a whole scene around a short prompt.
- :class:`WorldParaphraser` rewrites a caption into other captions stating the same facts.
- :class:`WorldSummarizer` picks mutually consistent captions from a group and writes one
  caption of a scene that makes them all true (the LLM step of ICSD).

Like a diffusion model with a fixed seed, every output depends only on (seed, input text),
not on the batch it came in.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from pairfree.world.language import ParsedObject, ParsedScene, Relation, parse_caption, realize
from pairfree.world.render import RenderStyle, render_scene, salience
from pairfree.world.scene import (
    GRID,
    Position,
    Scene,
    SceneObject,
    add_instances,
    relation_holds,
    weighted_choice,
)
from pairfree.world.variants import T2IFailures, WorldConfig

_SEARCH_BUDGET = 20_000  # layout search steps before a prompt's constraints are given up
# The default composition: the first open object goes to the center, the next ones beside it,
# then above and below it, then to the corners; every unstated size is large.
DEFAULT_CELLS: tuple[Position, ...] = (
    (1, 1), (1, 0), (1, 2), (0, 1), (2, 1), (0, 0), (0, 2), (2, 0), (2, 2),
)  # fmt: skip
DEFAULT_SIZE = "large"


def _rng(seed: int, text: str) -> np.random.Generator:
    digest = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng([seed, digest])


def layout(
    objects: Sequence[ParsedObject],
    relations: Sequence[Relation],
    rng: np.random.Generator,
    *,
    default: bool = False,
) -> list[Position] | None:
    """Distinct cells for ``objects`` keeping every stated cell and relation, or None when
    there are none (or the search runs out of budget). Open cells are tried in random order,
    or in the :data:`DEFAULT_CELLS` order when ``default``."""
    cells: list[Position | None] = [o.position for o in objects]
    stated = [c for c in cells if c is not None]
    if len(objects) > GRID * GRID or len(set(stated)) != len(stated):
        return None
    free = [divmod(k, GRID) for k in range(GRID * GRID) if divmod(k, GRID) not in stated]
    open_objects = [i for i, c in enumerate(cells) if c is None]
    order = (
        [free.index(c) for c in DEFAULT_CELLS if c in free]
        if default
        else rng.permutation(len(free))
    )
    steps = 0

    def consistent(i: int) -> bool:
        return all(
            relation_holds(cells[a], rel, cells[b])
            for a, rel, b in relations
            if i in (a, b) and cells[a] is not None and cells[b] is not None
        )

    def search(k: int) -> bool:
        nonlocal steps
        if k == len(open_objects):
            return True
        i = open_objects[k]
        for j in order:
            steps += 1
            if steps > _SEARCH_BUDGET:
                return False
            if free[j] in cells:
                continue
            cells[i] = free[j]
            if consistent(i) and search(k + 1):
                return True
            cells[i] = None
        return False

    if not all(consistent(i) for i in range(len(objects))) or not search(0):
        return None
    return cells


def scene_from_caption(
    text: str, config: WorldConfig, rng: np.random.Generator, *, default_layout: bool = False
) -> Scene:
    """The scene a caption describes, with unstated attributes drawn from ``config`` (or,
    with ``default_layout``, unstated cells and sizes from the default composition).

    Repeated objects are dropped; stated cells and relations are kept when they can all
    hold, otherwise relations and then stated cells are given up. Text that names no object
    gives an empty scene.
    """
    parsed = parse_caption(text)
    keep: dict[tuple, int] = {}
    for i, o in enumerate(parsed.objects):
        if o.color is not None and o.key not in keep:
            keep[o.key] = i
    seen_colors = config.seen(config.colors)
    for i, o in enumerate(parsed.objects):
        if o.color is None:
            options = {c: w for c, w in seen_colors.items() if (o.shape, c) not in keep}
            if options:
                keep[(o.shape, weighted_choice(rng, options))] = i
    chosen = sorted(keep.items(), key=lambda item: item[1])[: GRID * GRID]
    new_index = {old: new for new, (_, old) in enumerate(chosen)}
    objects = [replace(parsed.objects[old], color=key[1]) for key, old in chosen]
    relations = [
        (new_index[a], rel, new_index[b])
        for a, rel, b in parsed.relations
        if a in new_index and b in new_index
    ]
    open_cells = [replace(o, position=None) for o in objects]
    d = default_layout
    cells = (
        layout(objects, relations, rng, default=d)
        or layout(objects, (), rng, default=d)
        or layout(open_cells, (), rng, default=d)
    )

    def size(o: ParsedObject) -> str:
        return o.size or (DEFAULT_SIZE if d else weighted_choice(rng, config.sizes))

    return Scene(
        tuple(
            SceneObject(o.shape, o.color, size(o), cell)
            for o, cell in zip(objects, cells, strict=True)
        )
    )


def fill_scene(scene: Scene, config: WorldConfig, rng: np.random.Generator) -> Scene:
    """``scene`` set in a context and filled up to one of the world's object counts, as
    Stable Diffusion draws a whole plausible scene around the few things a prompt names: the
    context is the one the named shapes suggest, the extra objects sit behind the named ones
    (drawn first, so the prompt's objects stay on top)."""
    clutter = config.clutter
    if clutter is None:
        raise ValueError(f"world {config.name!r} is not cluttered: it has no contexts to fill")
    fit = {
        context: weight * math.prod(clutter.affinity.get(context, {}).get(o.shape, 1.0)
                                    for o in scene.objects)
        for context, weight in clutter.contexts.items()
    }  # fmt: skip
    context = weighted_choice(rng, fit)
    boosts = clutter.affinity.get(context, {})
    n = weighted_choice(rng, config.object_counts) - len(scene.objects)
    extra = add_instances(
        rng,
        scene.objects,
        max(n, 0),
        shapes={s: w * boosts.get(s, 1.0) for s, w in config.seen(config.shapes).items()},
        colors=config.seen(config.colors),
        sizes=config.sizes,
        concentration=clutter.concentration,
    )
    filled = Scene((*extra, *scene.objects), context)
    return replace(filled, salience=salience(filled, config.synthetic))


def _name(o: SceneObject) -> str:
    return f"the {o.color} {o.shape}"


def make_mistakes(
    scene: Scene, config: WorldConfig, failures: T2IFailures, rng: np.random.Generator
) -> tuple[Scene, list[str]]:
    """``scene`` with Stable Diffusion's mistakes drawn at the ``failures`` rates, and what
    was changed, in words. Each kind is drawn once per image, in a fixed order (drop, swap,
    extra), so the rates hold whatever the prompt."""
    objects, mistakes = list(scene.objects), []
    draws = rng.random(3)
    if len(objects) >= 2 and draws[0] < failures.drop_object:
        lost = objects.pop(int(rng.integers(len(objects))))
        mistakes.append(f"dropped {_name(lost)}")
    if objects and draws[1] < failures.swap_colors:
        taken = {o.key for o in objects}
        pairs = [
            (i, j)
            for i in range(len(objects))
            for j in range(i + 1, len(objects))
            if objects[i].color != objects[j].color
            and (objects[i].shape, objects[j].color) not in taken
            and (objects[j].shape, objects[i].color) not in taken
        ]
        if pairs:
            i, j = pairs[int(rng.integers(len(pairs)))]
            a, b = objects[i], objects[j]
            objects[i], objects[j] = replace(a, color=b.color), replace(b, color=a.color)
            mistakes.append(f"swapped the colors of {_name(a)} and {_name(b)}")
        else:
            k = int(rng.integers(len(objects)))
            colors = [c for c in config.seen(config.colors) if (objects[k].shape, c) not in taken]
            if colors:
                old = objects[k]
                objects[k] = replace(old, color=colors[int(rng.integers(len(colors)))])
                mistakes.append(f"drew {_name(old)} {objects[k].color}")
    free = [c for c in DEFAULT_CELLS if c not in {o.position for o in objects}]
    if objects and free and draws[2] < failures.extra_object:
        taken = {o.key for o in objects}
        shapes, colors = config.seen(config.shapes), config.seen(config.colors)
        key = (weighted_choice(rng, shapes), weighted_choice(rng, colors))
        while key in taken:
            key = (weighted_choice(rng, shapes), weighted_choice(rng, colors))
        cell = free[int(rng.integers(len(free)))]
        extra = SceneObject(key[0], key[1], weighted_choice(rng, config.sizes), cell)
        objects.append(extra)
        mistakes.append(f"added {_name(extra)}")
    return Scene(tuple(objects)), mistakes


@dataclass(frozen=True)
class Drawing:
    """What the world's text-to-image model drew for one prompt."""

    scene: Scene
    mistakes: tuple[str, ...]  # its departures from the prompt, in words
    image: Image.Image


class WorldTextToImage:
    """Text to image for the world: parse, complete, make SD's mistakes, draw in the
    synthetic style. ``failures`` defaults to the world's; ``T2IFailures.none()`` draws what
    the prompt says."""

    def __init__(
        self,
        config: WorldConfig | None = None,
        *,
        style: RenderStyle | None = None,
        failures: T2IFailures | None = None,
    ):
        self.config = config or WorldConfig()
        self.style = style or self.config.synthetic
        self.failures = self.config.t2i_failures if failures is None else failures

    def _compose(self, prompt: str, rng: np.random.Generator) -> tuple[Scene, list[str]]:
        default = bool(rng.random() < self.failures.default_layout)
        scene = scene_from_caption(prompt, self.config, rng, default_layout=default)
        scene, mistakes = make_mistakes(scene, self.config, self.failures, rng)
        if self.config.clutter is not None and scene.objects:
            scene = fill_scene(scene, self.config, rng)
        return scene, mistakes

    def draw(self, prompt: str, seed: int = 0) -> Drawing:
        rng = _rng(seed, prompt)
        scene, mistakes = self._compose(prompt, rng)
        image = render_scene(scene, rng, size=self.config.image_size, style=self.style)
        return Drawing(scene, tuple(mistakes), image)

    def scene_for(self, prompt: str, seed: int = 0) -> Scene:
        """The scene :meth:`generate` draws for ``prompt``."""
        return self._compose(prompt, _rng(seed, prompt))[0]

    def generate(self, prompts: Sequence[str], seed: int = 0) -> list[Image.Image]:
        return [self.draw(prompt, seed).image for prompt in prompts]


def probe_captions(config: WorldConfig, n: int = 4) -> list[str]:
    """Captions of ``n`` scenes drawn with a fixed seed: what a world backend's fingerprint
    asks it, so that another renderer or paraphraser behind the same name (a changed preset,
    another pairfree version) is told apart from the one a synthesis job started with."""
    from pairfree.world.language import caption_scene

    rng = np.random.default_rng(0)
    return [caption_scene(config.sample_scene(rng), rng, config.phrasing) for _ in range(n)]


def _digest(*parts: object) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return digest.hexdigest()[:10]


class WorldTextToImageBackend:
    """:class:`WorldTextToImage` behind the library's text-to-image protocol
    (``world:<preset>``): one image per (prompt, seed), never flagged NSFW, with its mistakes
    reported. Its fingerprint is its settings and the images it draws for fixed probes."""

    def __init__(self, preset: str) -> None:
        from pairfree.world.variants import world_preset

        config = world_preset(preset)
        self.name = f"world:{preset}"
        self.renderer = WorldTextToImage(config)
        probes = [self.renderer.draw(text, 0) for text in probe_captions(config)]
        self.fingerprint = _digest(config, *(d.image.tobytes() + repr(d.mistakes).encode()
                                             for d in probes))  # fmt: skip

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list:
        from pairfree.synth.text_to_image import GeneratedImage

        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        made = []
        for prompt, seed in zip(prompts, seeds, strict=True):
            drawing = self.renderer.draw(prompt, seed)
            made.append(GeneratedImage(drawing.image, seed, nsfw=False, mistakes=drawing.mistakes))
        return made


def load_world_text_to_image(
    preset: str, _settings=None, *, device=None
) -> WorldTextToImageBackend:
    """The ``world:<preset>`` text-to-image backend (``default``, ``shifted``, ``novel``, ``coco``)."""
    return WorldTextToImageBackend(preset or "default")


def _shortened(parsed: ParsedScene) -> list[ParsedScene]:
    """``parsed``, then with ever fewer details: no count, no sizes, no cells or relations."""
    plain = replace(parsed, count=None)
    unsized = replace(plain, objects=tuple(replace(o, size=None) for o in plain.objects))
    bare = ParsedScene(tuple(replace(o, position=None) for o in unsized.objects))
    return [parsed, plain, unsized, bare]


class WorldParaphraser:
    """Rephrases a caption with the world's templates and synonyms, keeping its facts.

    Given a word limit (SaCap asks for at most 15 words), a rewrite that cannot keep every
    fact within it drops details, as an LLM shortening a caption does: the count, then the
    sizes, then the cells and relations; a rewrite still over the limit is given anyway (an
    LLM overshoots too, and the answer is then rejected)."""

    def __init__(self, config: WorldConfig | None = None):
        self.config = config or WorldConfig()

    def rephrase(
        self, caption: str, n: int, seed: int = 0, *, max_words: int | None = None
    ) -> list[str]:
        """Up to ``n`` different rewrites; none when the caption names no object (as an LLM
        answer that does not parse is dropped)."""
        parsed = parse_caption(caption)
        if not parsed.objects:
            return []
        rng = _rng(seed, caption)
        out: list[str] = []
        for _ in range(20 * n):
            if len(out) == n:
                break
            for version in (v for v in _shortened(parsed) for _ in range(3)):
                text = realize(version, rng, self.config.phrasing)
                if max_words is None or len(text.split()) <= max_words:
                    break
            if text != caption and text not in out:
                out.append(text)
        return out


@dataclass(frozen=True)
class Summary:
    """A summarizer's answer: which captions of the group it kept, and their summary."""

    selected: tuple[int, ...]  # indices of the chosen captions in the group
    text: str


def _merge(scene: ParsedScene, caption: ParsedScene) -> ParsedScene | None:
    """``scene`` plus the facts of ``caption``, or None when they contradict each other
    (a stated count included) or the caption names an object too vaguely (no color) to be
    merged."""
    keys = [o.key for o in caption.objects]
    if not keys or any(o.color is None for o in caption.objects) or len(set(keys)) < len(keys):
        return None
    if None not in (scene.count, caption.count) and scene.count != caption.count:
        return None
    objects = list(scene.objects)
    index = {o.key: i for i, o in enumerate(objects)}
    remap = []
    for o in caption.objects:
        if o.key not in index:
            index[o.key] = len(objects)
            objects.append(o)
        else:
            old = objects[index[o.key]]
            for new_value, old_value in ((o.size, old.size), (o.position, old.position)):
                if None not in (new_value, old_value) and new_value != old_value:
                    return None
            objects[index[o.key]] = replace(
                old, size=old.size or o.size, position=old.position or o.position
            )
        remap.append(index[o.key])
    count = scene.count if scene.count is not None else caption.count
    if count is not None and count != len(objects):
        return None
    relations = [(remap[a], rel, remap[b]) for a, rel, b in caption.relations]
    return ParsedScene(tuple(objects), tuple(dict.fromkeys([*scene.relations, *relations])), count)


class WorldSummarizer:
    """Selects mutually consistent captions of a group and summarizes them as one scene.

    Captions are taken in order (the group's anchor first); one is selected when its facts
    can hold together with those already selected in a scene of at most ``max_objects``
    objects. A group with fewer than ``min_selected`` consistent captions gets no summary,
    as an LLM answer that does not parse is dropped.

    ICSD asks its LLM for 5-10 captions. World captions describe whole scenes, so they
    contradict each other more often than real ones: among groups of the 30 captions of a
    corpus that share the most words with an anchor, about one in five holds 5 consistent
    captions and three in four hold 2, hence ``min_selected=2`` by default.
    """

    def __init__(
        self,
        config: WorldConfig | None = None,
        *,
        min_selected: int = 2,
        max_selected: int = 10,
        max_objects: int = 4,
    ):
        if not 1 <= min_selected <= max_selected:
            raise ValueError(
                f"need 1 <= min_selected <= max_selected, got {min_selected}, {max_selected}"
            )
        if not 1 <= max_objects <= GRID * GRID:
            raise ValueError(f"max_objects must be in 1..{GRID * GRID}, got {max_objects}")
        self.config = config or WorldConfig()
        self.min_selected = min_selected
        self.max_selected = max_selected
        self.max_objects = max_objects

    def summarize(self, captions: Sequence[str], seed: int = 0) -> Summary | None:
        rng = _rng(seed, "\n".join(captions))
        scene, selected = ParsedScene(), []
        for k, caption in enumerate(captions):
            merged = _merge(scene, parse_caption(caption))
            if merged is None or len(merged.objects) > self.max_objects:
                continue
            if layout(merged.objects, merged.relations, rng) is None:
                continue
            scene = merged
            selected.append(k)
            if len(selected) == self.max_selected:
                break
        if len(selected) < self.min_selected:
            return None
        return Summary(tuple(selected), realize(scene, rng, self.config.phrasing))


class WorldLLM:
    """The world's paraphraser and summarizer behind the library's LLM protocol
    (``world:<preset>``): it answers the rephrase and select-summarize prompts as JSON, and a
    caption it cannot rewrite or a group it cannot summarize with an answer that does not
    parse, as an LLM's failures look."""

    _REPHRASE = re.compile(r"Given a description text: (.*?)\. Please rephrase", re.S)
    _LIMIT = re.compile(r"no longer than (\d+) words")
    _NUMBERED = re.compile(r"<(\d+)> (.*?)(?=\s*<\d+> |\s*$)", re.S)

    def __init__(self, preset: str) -> None:
        from pairfree.synth.tasks import rephrase_prompt, summarize_prompt
        from pairfree.world.variants import world_preset

        config = world_preset(preset)
        self.name = f"world:{preset}"
        self.paraphraser = WorldParaphraser(config)
        self.summarizer = WorldSummarizer(config)
        # its settings and its answers to fixed probes (what a resumed job must match)
        probes = probe_captions(config)
        asked = [rephrase_prompt(text) for text in probes] + [summarize_prompt(probes)]
        self.fingerprint = _digest(config, [self._answer(prompt, 0) for prompt in asked])

    def generate(self, prompts: Sequence[str], sampling) -> list[str]:
        return [self._answer(prompt, sampling.seed) for prompt in prompts]

    def _answer(self, prompt: str, seed: int) -> str:
        rephrase = self._REPHRASE.search(prompt)
        if rephrase:
            limit = self._LIMIT.search(prompt)
            texts = self.paraphraser.rephrase(
                rephrase.group(1), 3, seed, max_words=int(limit.group(1)) if limit else None
            )
            if len(texts) < 3:
                return "I cannot rephrase this description."
            return json.dumps({str(i): t for i, t in enumerate(texts, 1)})
        numbered = self._NUMBERED.findall(prompt)
        if numbered:
            summary = self.summarizer.summarize([c.strip() for _, c in numbered], seed)
            if summary is None:
                return "These sentences do not describe one scene."
            return str({"index": [i + 1 for i in summary.selected], "summary": summary.text})
        return "I do not know this task."


def load_world_llm(preset: str, **_options) -> WorldLLM:
    """The ``world:<preset>`` LLM backend."""
    return WorldLLM(preset or "default")
