"""How a world's scenes and captions compare with real data's published figures.

The figures a cluttered world is calibrated to (objects and categories per image, caption
length, how much of a scene a caption names) are measured here on a fixed sample, so the
README's realism table and the tests read the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pairfree.world.language import parse_caption, reference_captions
from pairfree.world.truth import match_objects
from pairfree.world.variants import WorldConfig

# Published anchors: (value, source). Lin et al., "Microsoft COCO: Common Objects in Context",
# ECCV 2014, section 5; Chen et al., "Microsoft COCO Captions", arXiv:1504.00325 (captions of
# at least eight words; Karpathy-split captions average about 10.5 words).
COCO_ANCHORS: dict[str, tuple[float, str]] = {
    "instances_per_image": (7.7, "Lin et al. 2014, sec. 5"),
    "categories_per_image": (3.5, "Lin et al. 2014, sec. 5"),
    "words_per_caption": (10.5, "COCO Karpathy split, commonly reported"),
}


@dataclass(frozen=True)
class WorldStatistics:
    scenes: int
    instances_per_image: float
    categories_per_image: float
    single_object_share: float  # scenes of one object
    salient_per_image: float
    words_per_caption: float
    objects_per_caption: float
    share_of_scene_named: float  # named objects over the scene's objects, per caption
    salient_share_of_named: float  # named objects that are salient
    distinct_subsets: float  # per scene of four or more objects: different subsets its refs name


def world_statistics(world: WorldConfig, *, scenes: int = 2000, seed: int = 0) -> WorldStatistics:
    """Scene and caption statistics of ``world`` on ``scenes`` training scenes."""
    rng = np.random.default_rng(seed)
    inst, cats, salient, words, named, shares, salient_named, subsets = ([] for _ in range(8))
    for _ in range(scenes):
        scene = world.sample_scene(rng)
        refs = reference_captions(scene, rng, world.phrasing, world.captions_per_image)
        inst.append(len(scene.objects))
        cats.append(len({o.shape for o in scene.objects}))
        top = set(scene.salient_objects())
        salient.append(len(top))
        seen = set()
        for ref in refs:
            matches = [i for i in match_objects(parse_caption(ref), scene) if i is not None]
            words.append(len(ref.split()))
            named.append(len(matches))
            shares.append(len(matches) / len(scene.objects))
            salient_named += [i in top for i in matches]
            seen.add(frozenset(matches))
        if len(scene.objects) >= 4:
            subsets.append(len(seen))
    return WorldStatistics(
        scenes=scenes,
        instances_per_image=float(np.mean(inst)),
        categories_per_image=float(np.mean(cats)),
        single_object_share=float(np.mean(np.array(inst) == 1)),
        salient_per_image=float(np.mean(salient)),
        words_per_caption=float(np.mean(words)),
        objects_per_caption=float(np.mean(named)),
        share_of_scene_named=float(np.mean(shares)),
        salient_share_of_named=float(np.mean(salient_named)),
        distinct_subsets=float(np.mean(subsets)) if subsets else float("nan"),
    )
