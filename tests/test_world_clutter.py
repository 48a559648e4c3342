"""The cluttered (COCO-like) world: scene statistics against their targets, contexts,
occlusion and salience, partial-view references, and the truth metrics that read them."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from pairfree.world import make_world
from pairfree.world.language import Phrasing, caption_scene, parse_caption, reference_captions
from pairfree.world.render import render_scene, salience
from pairfree.world.scene import Scene, SceneObject
from pairfree.world.statistics import world_statistics
from pairfree.world.truth import is_true, match_objects, truth_metrics
from pairfree.world.variants import T2IFailures, world_preset

N_SCENES = 3000


@pytest.fixture(scope="module")
def sample() -> list[tuple[Scene, list[str]]]:
    world = world_preset("coco")
    rng = np.random.default_rng(7)
    out = []
    for _ in range(N_SCENES):
        scene = world.sample_scene(rng)
        out.append((scene, reference_captions(scene, rng, world.phrasing, 5)))
    return out


def test_scene_statistics_match_their_targets(sample):
    """COCO: 7.7 instances of 3.5 categories per image, long-tailed (Lin et al. 2014); the
    3x3 grid caps a scene at nine, so the targets are a mean of about 5.6 instances and
    COCO's ratio of instances to categories (about 2); captions of about 10 words naming a
    few, mostly salient, objects, each reference its own subset."""
    stats = world_statistics(world_preset("coco"), scenes=N_SCENES, seed=7)
    assert 5.2 <= stats.instances_per_image <= 6.0
    assert 1.7 <= stats.instances_per_image / stats.categories_per_image <= 2.3
    assert 9.5 <= stats.words_per_caption <= 12.0
    assert 1.7 <= stats.objects_per_caption <= 2.4
    assert stats.share_of_scene_named < 0.6
    assert stats.distinct_subsets > 3.0
    counts = Counter(len(s.objects) for s, _ in sample)
    assert set(counts) == set(range(1, 10))  # every count occurs, one to a full grid
    assert counts[1] / N_SCENES < 0.1 and counts[9] / N_SCENES > 0.08
    # several instances of one shape are common, as several people or cars are in COCO
    assert np.mean([len(s.objects) > len({o.shape for o in s.objects}) for s, _ in sample]) > 0.75


def test_contexts_make_shapes_co_occur(sample):
    by_context: dict[str, Counter] = {}
    for scene, _ in sample:
        by_context.setdefault(scene.context, Counter()).update(o.shape for o in scene.objects)

    def share(context: str, shape: str) -> float:
        return by_context[context][shape] / sum(by_context[context].values())

    assert set(by_context) == {"night", "garden", "street", "workshop"}
    assert share("night", "star") > 2 * share("garden", "star")
    assert share("garden", "heart") > 2 * share("street", "heart")


def test_large_objects_cover_their_neighbours_and_salience_reads_it():
    style = world_preset("coco").render
    small = SceneObject("circle", "red", "small", (1, 0))
    alone = salience(Scene((small,)), style)[0]
    big = SceneObject("circle", "blue", "large", (1, 1))
    covered = salience(Scene((small, big)), style)[0]  # drawn later, the big one covers it
    on_top = salience(Scene((big, small)), style)[1]
    assert covered < 0.9 * alone and on_top == pytest.approx(alone)
    # a central object outranks the same object in a corner, a large one a small one
    corner = salience(Scene((replace(small, position=(0, 0)),)), style)[0]
    centre = salience(Scene((replace(small, position=(1, 1)),)), style)[0]
    assert centre > corner
    assert salience(Scene((big,)), style)[0] > 3 * centre


def test_references_are_true_partial_views(sample):
    for scene, refs in sample:
        assert len(refs) == 5
        for ref in refs:
            assert is_true(parse_caption(ref), scene, complete=False), (ref, scene)
    partial = [len(parse_caption(r).objects) < len(s.objects) for s, refs in sample for r in refs]
    assert np.mean(partial) > 0.8


def test_captions_prefer_salient_objects(sample):
    picked = total = 0
    for scene, refs in sample:
        salient = set(scene.salient_objects())
        if len(salient) == len(scene.objects):
            continue
        for ref in refs:
            matches = [i for i in match_objects(parse_caption(ref), scene) if i is not None]
            picked += sum(i in salient for i in matches)
            total += len(matches)
    chance = np.mean(
        [len(s.salient_objects()) / len(s.objects) for s, _ in sample if len(s.objects) > 1]
    )
    assert picked / total > chance + 0.2


def test_salient_recall_counts_the_salient_objects_only():
    objects = (
        SceneObject("circle", "red", "large", (1, 1)),
        SceneObject("star", "blue", "small", (0, 0)),
        SceneObject("square", "green", "small", (2, 2)),
    )
    scene = Scene(objects, "night", (0.2, 0.01, 0.01))
    assert scene.salient_objects() == (0,)
    scores = truth_metrics({"a": "a red circle"}, {"a": scene})
    assert scores["salient_recall"] == 100.0
    assert scores["object_recall"] == pytest.approx(100 / 3)
    missed = truth_metrics({"a": "a blue star and a green square"}, {"a": scene})
    assert missed["salient_recall"] == 0.0 and missed["object_precision"] == 100.0
    # a sparse scene (no salience) has every object salient
    assert Scene(objects).salient_objects() == (0, 1, 2)


def test_scene_round_trip_and_bad_fields():
    scene = world_preset("coco").sample_scene(np.random.default_rng(3))
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    d = scene.to_dict()
    with pytest.raises(ValueError, match="salience"):
        Scene.from_dict({**d, "salience": d["salience"][:-1]})
    with pytest.raises(ValueError, match="salience"):
        Scene.from_dict({**d, "salience": ["a"] * len(d["objects"])})
    with pytest.raises(ValueError, match="context"):
        Scene.from_dict({**d, "context": "moon"})
    # a sparse world's scene file is written as before
    assert set(world_preset("default").sample_scene(np.random.default_rng(3)).to_dict()) == {
        "objects"
    }


def test_a_partial_view_cannot_state_the_count():
    with pytest.raises(ValueError, match="count"):
        Phrasing(mentions=(1.0,), p_count=0.5)


def test_the_default_world_still_names_every_object():
    world = world_preset("default")
    rng = np.random.default_rng(11)
    for _ in range(200):
        scene = world.sample_scene(rng)
        assert is_true(parse_caption(caption_scene(scene, rng, world.phrasing)), scene)


def test_make_world_writes_contexts_salience_and_backgrounds(tmp_path):
    paths = make_world(tmp_path / "w", preset="coco", n_train_images=6, n_val=2, n_test=4,
                       n_corpus=20, seed=1)  # fmt: skip
    scenes = json.loads(paths.scenes.read_text())
    assert all("context" in s and len(s["salience"]) == len(s["objects"]) for s in scenes.values())
    corpus = paths.corpus.read_text().splitlines()
    assert len(corpus) == 20 and all(parse_caption(c).objects for c in corpus)
    # the context shows as the background colour
    night = Scene((), "night")
    street = Scene((), "street")
    rng = np.random.default_rng(0)
    style = world_preset("coco").render
    a = np.asarray(render_scene(night, rng, style=style), dtype=float).mean(axis=(0, 1))
    b = np.asarray(render_scene(street, rng, style=style), dtype=float).mean(axis=(0, 1))
    assert a[2] > a[0] + 20 and abs(b[0] - b[2]) < 10


def test_text_to_image_draws_a_whole_scene_around_the_prompt():
    """As Stable Diffusion does for a short prompt: the named objects on top, other objects
    of a context the named shapes suggest behind them."""
    from pairfree.world.synth import WorldTextToImage, fill_scene

    world = world_preset("coco")
    t2i = WorldTextToImage(world, failures=T2IFailures.none())
    sizes, contexts = [], Counter()
    for seed in range(200):
        scene = t2i.scene_for("a yellow star and a white circle", seed)
        named = [o.key for o in scene.objects[-2:]]
        assert named == [("star", "yellow"), ("circle", "white")]
        sizes.append(len(scene.objects))
        contexts[scene.context] += 1
        assert scene.salience is not None and len(scene.salience) == len(scene.objects)
    assert np.mean(sizes) > 4.5
    assert contexts.most_common(1)[0][0] == "night"  # where stars are
    # a sparse world draws exactly the prompt
    sparse = WorldTextToImage(world_preset("default"), failures=T2IFailures.none())
    assert len(sparse.scene_for("a yellow star and a white circle", 0).objects) == 2
    with pytest.raises(ValueError, match="not cluttered"):
        fill_scene(Scene(()), world_preset("default"), np.random.default_rng(0))


def test_realism_table_prints_the_world_beside_coco(capsys, monkeypatch):
    import sys

    from bench import world_realism

    monkeypatch.setattr(sys, "argv", ["world_realism.py", "--scenes", "200"])
    world_realism.main()
    rows = {line.split("|")[1].strip(): line for line in capsys.readouterr().out.splitlines()[2:]}
    assert "7.7" in rows["instances_per_image"] and "Lin et al." in rows["instances_per_image"]
    world_value = float(rows["share_of_scene_named"].split("|")[2])
    assert 0.2 < world_value < 0.7


def test_world_make_writes_the_cluttered_world(tmp_path, capsys):
    from pairfree.cli import main

    out = tmp_path / "coco"
    main(["world", "make", str(out), "--preset", "coco", "--train-images", "2", "--val", "1",
          "--test", "3", "--corpus", "8"])  # fmt: skip
    dataset = json.loads((out / "dataset_world.json").read_text())
    assert dataset["world"] == "coco"
    assert all(set(image["scene"]) == {"objects", "context", "salience"}
               for image in dataset["images"])  # fmt: skip


def test_the_cross_domain_partner_shifts_what_scenes_hold_and_how_captions_read():
    """``coco-shifted`` is to ``coco`` what Flickr30k is to COCO: the same words, fewer
    objects per image, other settings, longer captions in another style."""
    coco = world_statistics(world_preset("coco"), scenes=1000, seed=3)
    shifted = world_statistics(world_preset("coco-shifted"), scenes=1000, seed=3)
    assert shifted.instances_per_image < coco.instances_per_image - 0.7
    assert shifted.words_per_caption > coco.words_per_caption + 1.0
    world, rng = world_preset("coco-shifted"), np.random.default_rng(3)
    scenes = [world.sample_scene(rng) for _ in range(600)]
    contexts = Counter(s.context for s in scenes)
    assert contexts["night"] + contexts["street"] > 2.5 * (
        contexts["garden"] + contexts["workshop"]
    )
    for scene in scenes[:100]:
        for caption in reference_captions(scene, rng, world.phrasing, 2):
            assert caption[0].isupper() and caption.endswith("."), caption
            assert is_true(parse_caption(caption), scene, complete=False), caption
