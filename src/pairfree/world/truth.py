"""Score captions by what they claim about the image, which the world knows exactly.

CIDEr saturates on templated references; truth does not. Each caption is parsed back into
objects and attributes and compared with its scene. A parsed object matches a scene object
when shape and color agree; each scene object matches at most once, so a repeated object
counts against precision.

CHAIR-i / CHAIR-s (Rohrbach et al., EMNLP 2018; :mod:`pairfree.evaluate.chair`) take the shape
as the object category: every named object is a mention, hallucinated when no object of the
scene has its shape (a wrong color is an attribute error, not CHAIR's); the ground truth is the
whole scene, which the world knows exactly.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping

from pairfree.errors import BadInputError, SkipLog
from pairfree.evaluate.chair import chair_from_mentions
from pairfree.world.language import ParsedScene, parse_caption
from pairfree.world.scene import Scene, relation_holds


def match_objects(parsed: ParsedScene, scene: Scene) -> list[int | None]:
    """For each parsed object, the index of the scene object it matches, or None."""
    index = {o.key: i for i, o in enumerate(scene.objects)}
    used: set[int] = set()
    matches: list[int | None] = []
    for o in parsed.objects:
        i = index.get(o.key)
        matches.append(i if i is not None and i not in used else None)
        if i is not None:
            used.add(i)
    return matches


def is_true(parsed: ParsedScene, scene: Scene, *, complete: bool = True) -> bool:
    """Whether every object, attribute, relation and count ``parsed`` states holds in
    ``scene``; with ``complete`` it must also name every object of the scene."""
    if not parsed.objects:
        return False
    matches = match_objects(parsed, scene)
    if None in matches:
        return False
    for o, i in zip(parsed.objects, matches, strict=True):
        truth = scene.objects[i]
        if o.size not in (None, truth.size) or o.position not in (None, truth.position):
            return False
    for a, rel, b in parsed.relations:
        if not relation_holds(
            scene.objects[matches[a]].position, rel, scene.objects[matches[b]].position
        ):
            return False
    if parsed.count is not None and parsed.count != len(scene.objects):
        return False
    return not complete or len(parsed.objects) == len(scene.objects)


def _percent(hits: int, total: int) -> float:
    return 100.0 * hits / total if total else math.nan


def truth_metrics(
    generated: Mapping[Hashable, str],
    scenes: Mapping[Hashable, Scene],
    *,
    skip_log: SkipLog | None = None,
) -> dict[str, float]:
    """Truth scores (x100) of one caption per image; ids are compared as strings.

    - ``object_precision`` / ``object_recall``: matched objects over parsed / scene objects;
    - ``salient_recall``: matched salient objects (:meth:`Scene.salient_objects`, every object
      in a sparse world) over salient objects: what a caption of a cluttered scene should name;
    - ``exact_scene``: captions whose (shape, color) objects are exactly the scene's;
    - ``size_accuracy`` / ``position_accuracy``: stated sizes / cells of matched objects that
      are right; ``relation_accuracy``: stated relations between matched objects that hold
      (NaN when nothing of the kind was stated);
    - ``unparseable``: captions that name no object with both a shape and a color;
    - ``chair_i`` / ``chair_s``: named objects / captions with a shape the scene lacks
      (CHAIR-i and CHAIR-s, lower is better; ``chair_i`` is NaN when no object was named).

    A caption whose id has no scene is skipped into ``skip_log`` (raised without one).
    """
    by_id = {str(k): v for k, v in scenes.items()}
    n = parsed_total = scene_total = matched = exact = unparseable = 0
    salient_total = salient_matched = 0
    stated = Counter[str]()
    right = Counter[str]()
    chair: list[tuple[list[str], set[str]]] = []
    for image_id, caption in generated.items():
        scene = by_id.get(str(image_id))
        if scene is None or not isinstance(caption, str):
            reason = "no scene for this image" if scene is None else "caption is not a string"
            error = BadInputError("generated captions", reason, item_id=str(image_id))
            if skip_log is None:
                raise error
            skip_log.skip(error)
            continue
        parsed = parse_caption(caption)
        matches = match_objects(parsed, scene)
        n += 1
        parsed_total += len(parsed.objects)
        scene_total += len(scene.objects)
        matched += sum(i is not None for i in matches)
        salient = set(scene.salient_objects())
        salient_total += len(salient)
        salient_matched += len(salient.intersection(matches))
        exact += Counter(o.key for o in parsed.objects) == Counter(o.key for o in scene.objects)
        unparseable += not any(o.color is not None for o in parsed.objects)
        chair.append(([o.shape for o in parsed.objects], {o.shape for o in scene.objects}))
        for o, i in zip(parsed.objects, matches, strict=True):
            if i is None:
                continue
            truth = scene.objects[i]
            for attr, value, true_value in (
                ("size", o.size, truth.size),
                ("position", o.position, truth.position),
            ):
                if value is not None:
                    stated[attr] += 1
                    right[attr] += value == true_value
        for a, rel, b in parsed.relations:
            if matches[a] is not None and matches[b] is not None:
                stated["relation"] += 1
                pa, pb = scene.objects[matches[a]].position, scene.objects[matches[b]].position
                right["relation"] += relation_holds(pa, rel, pb)
    hallucination = chair_from_mentions(chair)
    return {
        "object_precision": _percent(matched, parsed_total),
        "object_recall": _percent(matched, scene_total),
        "salient_recall": _percent(salient_matched, salient_total),
        "exact_scene": _percent(exact, n),
        "size_accuracy": _percent(right["size"], stated["size"]),
        "position_accuracy": _percent(right["position"], stated["position"]),
        "relation_accuracy": _percent(right["relation"], stated["relation"]),
        "unparseable": _percent(unparseable, n),
        "chair_i": hallucination["CHAIR_i"],
        "chair_s": hallucination["CHAIR_s"],
        "n_captions": float(n),
    }
