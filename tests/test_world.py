"""The shapes world: determinism, caption truth, synthesis, the novel split, truth metrics,
export."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from dataclasses import replace
from itertools import combinations
from pathlib import Path

import numpy as np
import pytest

from pairfree.errors import BadInputError, PairfreeError, SkipLog
from pairfree.world import (
    ParsedObject,
    ParsedScene,
    Scene,
    SceneObject,
    WorldConfig,
    WorldParaphraser,
    WorldSummarizer,
    WorldTextToImage,
    is_true,
    load_scenes,
    make_world,
    parse_caption,
    realize,
    reference_captions,
    render_scene,
    truth_metrics,
    world_preset,
)
from pairfree.world.language import describe, surface_forms
from pairfree.world.render import place_objects
from pairfree.world.variants import NOVEL_WORDS, T2IFailures

PRESETS = ("default", "shifted", "novel")


def obj(shape, color, size="medium", position=(1, 1)):
    return SceneObject(shape, color, size, position)


def sample_scenes(preset: str, n: int, seed: int = 0) -> list[tuple[Scene, np.random.Generator]]:
    config = world_preset(preset)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        out.append((config.sample_scene(rng, include_held_out=preset == "novel"), rng))
    return out


def small_world(root: Path, **kwargs) -> Path:
    args = dict(n_train_images=6, n_val=2, n_test=3, n_corpus=20, seed=0)
    args.update(kwargs)
    return make_world(root, **args).root


def read_tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def captions_of(tree: dict[str, bytes]) -> list[str]:
    images = json.loads(tree["dataset_world.json"])["images"]
    return [s["raw"] for e in images for s in e["sentences"]]


def has_phrase(text: str, phrase: str) -> bool:
    return re.search(rf"\b{re.escape(phrase)}\b", text.lower().replace("-", " ")) is not None


# --- determinism -----------------------------------------------------------------------------


def test_same_seed_gives_same_bytes_and_other_seed_differs(tmp_path):
    a = read_tree(small_world(tmp_path / "a"))
    b = read_tree(small_world(tmp_path / "b"))
    c = read_tree(small_world(tmp_path / "c", seed=1))
    assert a == b
    pngs = [k for k in a if k.endswith(".png")]
    assert len(pngs) == 11
    assert all(a[k] != c[k] for k in pngs)
    assert a["corpus.txt"] != c["corpus.txt"]
    assert captions_of(a) == captions_of(b) != captions_of(c)


# --- scenes and rendering --------------------------------------------------------------------


def test_scene_validation_and_round_trip():
    scene = Scene((obj("circle", "red", "large", (0, 0)), obj("star", "blue", "small", (2, 1))))
    assert Scene.from_dict(json.loads(json.dumps(scene.to_dict()))) == scene
    assert (0, "left of", 1) in scene.relations() and (1, "below", 0) in scene.relations()
    with pytest.raises(ValueError, match="share a cell"):
        Scene((obj("circle", "red"), obj("star", "blue")))
    with pytest.raises(ValueError, match="share a \\(shape, color\\)"):
        Scene((obj("circle", "red", position=(0, 0)), obj("circle", "red", position=(0, 1))))
    with pytest.raises(ValueError, match="unknown shape"):
        obj("blob", "red")


def test_objects_never_overlap_and_render_is_rgb():
    config = world_preset("default")
    for scene, rng in sample_scenes("shifted", 200):
        placements = place_objects(scene, rng, size=64, style=config.render)
        for p, q in combinations(placements, 2):
            assert math.dist(p.center, q.center) > p.radius + q.radius
    image = render_scene(scene, rng, size=48)
    assert image.mode == "RGB" and image.size == (48, 48)


def test_render_shows_objects_in_their_cells():
    scene = Scene((obj("square", "red", "large", (0, 0)), obj("circle", "blue", "large", (2, 2))))
    pixels = np.asarray(render_scene(scene, np.random.default_rng(0)), dtype=float)
    assert pixels[10, 10, 0] > 180 and pixels[10, 10, 2] < 80  # red in the top-left cell
    assert pixels[53, 53, 2] > 180 and pixels[53, 53, 0] < 100  # blue in the bottom-right
    assert pixels[32, 32].max() < 60  # empty center


# --- captions and parser ---------------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_reference_captions_are_true_and_round_trip(preset):
    config = world_preset(preset)
    for scene, rng in sample_scenes(preset, 150):
        for caption in reference_captions(scene, rng, config.phrasing, 5):
            assert is_true(parse_caption(caption), scene), caption
        planned = describe(scene, rng, config.phrasing)
        caption = realize(planned, rng, config.phrasing)
        assert parse_caption(caption).facts() == planned.facts(), caption


def test_parser_reads_hand_written_captions():
    p = parse_caption("There is a BIG red circle at the upper-left corner.")
    assert p.objects == (ParsedObject("circle", "red", "large", (0, 0)),)
    p = parse_caption("a red disc to the left of a small blue box")
    assert [o.key for o in p.objects] == [("circle", "red"), ("square", "blue")]
    assert p.objects[1].size == "small" and p.relations == ((0, "left of", 1),)
    p = parse_caption(
        "three shapes: in the center there is a green star, a pink heart is below the green "
        "star and a huge white plus sign sits on the right"
    )
    assert p.count == 3 and len(p.objects) == 3
    assert p.objects[0].position == (1, 1) and p.objects[2].position == (1, 2)
    assert p.objects[2] == ParsedObject("cross", "white", "large", (1, 2))
    assert p.relations == ((1, "below", 0),)
    assert parse_caption("a purple rhombus, which is over a cyan moon").relations == (
        (0, "above", 1),
    )
    assert parse_caption("a dog on a sofa") == ParsedScene()


def test_captions_bind_attributes_to_the_right_object():
    scene = Scene((obj("circle", "red", "large", (0, 0)), obj("square", "blue", "small", (1, 1))))
    assert is_true(parse_caption("a large red circle and a small blue square"), scene)
    assert not is_true(parse_caption("a large blue circle and a small red square"), scene)
    assert not is_true(parse_caption("a small red circle and a large blue square"), scene)
    assert not is_true(parse_caption("a red circle in the center and a blue square"), scene)
    assert not is_true(parse_caption("a blue square to the left of a red circle"), scene)
    assert not is_true(parse_caption("a red circle"), scene)
    assert is_true(parse_caption("a red circle"), scene, complete=False)


def test_different_scenes_rarely_share_a_caption():
    config = world_preset("default")
    scenes_of = defaultdict(set)
    for scene, rng in sample_scenes("default", 1000, seed=3):
        for caption in reference_captions(scene, rng, config.phrasing, 5):
            scenes_of[caption].add(scene)
    shared = sum(len(s) > 1 for s in scenes_of.values())
    assert len(scenes_of) > 4500
    assert shared / len(scenes_of) < 0.01


# --- synthesizer, paraphraser, summarizer ----------------------------------------------------


@pytest.mark.parametrize("preset", ("default", "shifted"))
def test_paraphrases_state_the_same_facts(preset):
    config = world_preset(preset)
    paraphraser = WorldParaphraser(config)
    for scene, rng in sample_scenes(preset, 60, seed=5):
        caption = reference_captions(scene, rng, config.phrasing, 1)[0]
        rewrites = paraphraser.rephrase(caption, 3, seed=0)
        assert len(rewrites) == 3 and caption not in rewrites and len(set(rewrites)) == 3
        for text in rewrites:
            assert parse_caption(text).facts() == parse_caption(caption).facts()
            assert is_true(parse_caption(text), scene), (caption, text)
    assert paraphraser.rephrase("nothing to see here", 3) == []


def test_paraphrases_within_a_word_limit_drop_details_not_objects():
    config = world_preset("default")
    paraphraser = WorldParaphraser(config)
    within = total = 0
    for scene, rng in sample_scenes("default", 80, seed=6):
        caption = reference_captions(scene, rng, config.phrasing, 1)[0]
        for text in paraphraser.rephrase(caption, 3, seed=0, max_words=15):
            total += 1
            within += len(text.split()) <= 15
            assert parse_caption(text).facts() <= parse_caption(caption).facts()
            assert is_true(parse_caption(text), scene), (caption, text)  # every object kept
    assert within / total > 0.95


def test_faithful_synthesizer_draws_what_the_caption_says_in_another_style():
    config = world_preset("default")
    t2i = WorldTextToImage(config, failures=T2IFailures.none())
    captions, real_scenes = [], []
    for scene, rng in sample_scenes("default", 80, seed=7):
        captions.append(reference_captions(scene, rng, config.phrasing, 1)[0])
        real_scenes.append(scene)
    for caption in captions:
        assert is_true(parse_caption(caption), t2i.scene_for(caption, seed=0)), caption
    synthetic = t2i.generate(captions, seed=0)
    real = [render_scene(s, np.random.default_rng(i)) for i, s in enumerate(real_scenes)]

    def roughness(image):  # mean horizontal pixel change: stripes and hard edges raise it
        return np.abs(np.diff(np.asarray(image, dtype=float), axis=1)).mean()

    assert min(map(roughness, synthetic)) > 1.5 * max(map(roughness, real))
    # same (seed, prompt) -> same image, wherever the prompt sits in the batch
    again = t2i.generate([captions[3], captions[0]], seed=0)
    assert again[1].tobytes() == synthetic[0].tobytes()
    assert again[0].tobytes() == synthetic[3].tobytes()
    assert t2i.generate([captions[0]], seed=1)[0].tobytes() != synthetic[0].tobytes()


def test_synthesizer_completes_and_repairs_prompts():
    t2i = WorldTextToImage(world_preset("default"), failures=T2IFailures.none())
    scene = t2i.scene_for("a circle in the center above a large yellow star")
    assert [o.shape for o in scene.objects] == ["circle", "star"]
    assert scene.objects[0].position == (1, 1) and scene.objects[1].size == "large"
    assert scene.objects[1].position[0] == 2
    contradictory = (
        "a red circle left of a blue square, and the blue square is left of the red circle"
    )
    assert len(t2i.scene_for(contradictory).objects) == 2
    assert t2i.scene_for("a red circle and a red circle").objects[0].key == ("circle", "red")
    assert t2i.scene_for("hello world").objects == ()


def test_synthesizer_makes_stable_diffusion_mistakes_at_the_configured_rates():
    config = world_preset("default")
    failures = T2IFailures(drop_object=0.3, swap_colors=0.2, extra_object=0.1, default_layout=0.5)
    t2i = WorldTextToImage(config, failures=failures)
    captions, kinds, multi = [], defaultdict(int), 0
    for scene, rng in sample_scenes("default", 1500, seed=11):
        captions.append(reference_captions(scene, rng, config.phrasing, 1)[0])
        multi += len(scene.objects) >= 2
    for seed, caption in enumerate(captions):
        drawing = t2i.draw(caption, seed)
        for mistake in drawing.mistakes:
            kinds[mistake.split()[0]] += 1
        # every departure from the prompt is reported, and nothing else is
        assert is_true(parse_caption(caption), drawing.scene) == (not drawing.mistakes), caption
    n = len(captions)

    def close(observed: int, rate: float, trials: int) -> bool:  # within 4 binomial std
        return abs(observed - rate * trials) <= 4 * math.sqrt(rate * (1 - rate) * trials)

    assert close(kinds["dropped"], 0.3, multi)
    assert close(kinds["swapped"] + kinds["drew"], 0.2, n)
    assert close(kinds["added"], 0.1, n)


def test_synthesizer_default_layout_narrows_what_the_prompt_leaves_open():
    config = world_preset("default")

    def compositions(default_layout: float) -> set:
        failures = replace(T2IFailures.none(), default_layout=default_layout)
        t2i = WorldTextToImage(config, failures=failures)
        scenes = [t2i.scene_for("a red circle and a blue star", seed) for seed in range(60)]
        return {tuple((o.position, o.size) for o in s.objects) for s in scenes}

    assert compositions(1.0) == {(((1, 1), "large"), ((1, 0), "large"))}
    assert len(compositions(0.0)) > 20
    # what the prompt states is kept under the default composition too
    t2i = WorldTextToImage(config, failures=replace(T2IFailures.none(), default_layout=1.0))
    scene = t2i.scene_for("a small red circle in the top left and a blue star")
    assert scene.objects[0].position == (0, 0) and scene.objects[0].size == "small"
    assert scene.objects[1].position == (1, 1)
    with pytest.raises(ValueError, match="must be a probability"):
        T2IFailures(drop_object=1.5)


def test_summarizer_selects_consistent_captions():
    captions = [
        "a red circle in the top left",
        "a small blue square in the center",
        "a red circle in the bottom right",  # contradicts the first caption
        "a large red circle to the left of a green star",
        "a dog on a sofa",
    ]
    summarizer = WorldSummarizer(world_preset("default"))
    summary = summarizer.summarize(captions, seed=0)
    assert summary is not None and summary.selected == (0, 1, 3)
    summary_scene = parse_caption(summary.text)
    assert {o.key for o in summary_scene.objects} == {
        ("circle", "red"),
        ("square", "blue"),
        ("star", "green"),
    }
    faithful = WorldTextToImage(world_preset("default"), failures=T2IFailures.none())
    image_scene = faithful.scene_for(summary.text)
    for k in summary.selected:
        assert is_true(parse_caption(captions[k]), image_scene, complete=False)
    assert WorldSummarizer(min_selected=4).summarize(captions) is None
    counted = ["two shapes: a red circle and a blue square", "a green star", "a blue square"]
    assert WorldSummarizer(min_selected=1).summarize(counted).selected == (0, 2)


# --- novel split -----------------------------------------------------------------------------


@pytest.mark.parametrize("preset", ["novel", "coco-novel"])
def test_novel_split_holds_words_out_of_training_text(tmp_path, preset):
    paths = make_world(
        tmp_path, preset=preset, n_train_images=60, n_val=10, n_test=80, n_corpus=400, seed=2
    )
    forms = [form for word in NOVEL_WORDS for form in surface_forms(word)]
    corpus = paths.corpus.read_text().splitlines()
    images = json.loads(paths.dataset.read_text())["images"]
    training_text = corpus + [
        s["raw"] for e in images if e["split"] != "test" for s in e["sentences"]
    ]
    assert not any(has_phrase(t, f) for t in training_text for f in forms)
    for e in images:
        words = {w for o in e["scene"]["objects"] for w in (o["shape"], o["color"])}
        novel = [
            o["shape"] in NOVEL_WORDS or o["color"] in NOVEL_WORDS for o in e["scene"]["objects"]
        ]
        expected = "in" if not any(novel) else "out" if all(novel) else "near"
        assert e["domain"] == expected
        if e["split"] != "test":
            assert not words & set(NOVEL_WORDS)
    test = [e for e in images if e["split"] == "test"]
    assert {e["domain"] for e in test} == {"in", "near", "out"}
    test_text = [s["raw"] for e in test for s in e["sentences"]]
    mentioned = {
        w for w in NOVEL_WORDS for f in surface_forms(w) if any(has_phrase(t, f) for t in test_text)
    }
    assert mentioned == set(NOVEL_WORDS)


# --- truth metrics ---------------------------------------------------------------------------


def test_truth_metrics_on_hand_built_cases():
    scenes = {
        "a": Scene((obj("circle", "red", "large", (0, 0)), obj("square", "blue", "small", (1, 1)))),
        "b": Scene((obj("star", "green", "medium", (2, 2)),)),
    }
    perfect = {
        "a": "a large red circle in the top left is left of a small blue square",
        "b": "a medium green star in the bottom right",
    }
    m = truth_metrics(perfect, scenes)
    lower_is_better = ("unparseable", "n_captions", "chair_i", "chair_s")
    assert all(m[k] == 100.0 for k in m if k not in lower_is_better)
    assert m["unparseable"] == 0.0 and m["n_captions"] == 2.0
    assert m["chair_i"] == 0.0 and m["chair_s"] == 0.0

    swapped = {"a": "a red square and a blue circle", "b": perfect["b"]}
    m = truth_metrics(swapped, scenes)
    assert m["object_precision"] == pytest.approx(100 / 3)
    assert m["object_recall"] == pytest.approx(100 / 3)
    assert m["exact_scene"] == 50.0

    partial = {"a": "a small red circle at the bottom", "b": "a green star above a green star"}
    m = truth_metrics(partial, scenes)
    assert m["object_recall"] == pytest.approx(200 / 3)
    assert m["object_precision"] == pytest.approx(200 / 3)  # the repeated star is unmatched
    assert m["size_accuracy"] == 0.0 and m["position_accuracy"] == 0.0
    assert m["exact_scene"] == 0.0 and math.isnan(m["relation_accuracy"])

    wrong_relation = {"a": "a red circle below a blue square", "b": "a dog"}
    m = truth_metrics(wrong_relation, scenes)
    assert m["relation_accuracy"] == 0.0 and m["unparseable"] == 50.0

    with pytest.raises(BadInputError, match="id c"):
        truth_metrics({"c": "a red circle"}, scenes)
    log = SkipLog()
    m = truth_metrics({"c": "a red circle", "b": perfect["b"]}, scenes, skip_log=log)
    assert len(log) == 1 and m["n_captions"] == 1.0


def test_world_chair_counts_shapes_the_scene_lacks():
    """CHAIR with the shape as the object: a shape absent from the scene is hallucinated, a
    wrong color is not (an attribute error), and every named object is a mention."""
    scenes = {
        "a": Scene((obj("circle", "red", position=(0, 0)), obj("square", "blue"))),
        "b": Scene((obj("star", "green"),)),
        "c": Scene((obj("heart", "red"),)),
    }
    captions = {
        "a": "a red circle and a blue triangle",  # the triangle: 1 of 2 mentions
        "b": "a blue star above a green star",  # wrong color, repeated: 2 true mentions
        "c": "a red cross and a red diamond",  # 2 of 2 made up
    }
    m = truth_metrics(captions, scenes)
    assert m["chair_i"] == pytest.approx(100 * 3 / 6)
    assert m["chair_s"] == pytest.approx(100 * 2 / 3)
    assert m["object_precision"] == pytest.approx(100 * 2 / 6)  # colors count there
    m = truth_metrics({"b": "a picture"}, scenes)
    assert math.isnan(m["chair_i"]) and m["chair_s"] == 0.0


# --- export ----------------------------------------------------------------------------------


def test_make_world_writes_karpathy_json_and_resumes(tmp_path, monkeypatch):
    root = small_world(tmp_path / "w", n_train_images=5, n_val=2, n_test=3, n_corpus=30)
    with open(root / "dataset_world.json", encoding="utf-8") as f:
        images = json.load(f)["images"]
    assert [e["split"] for e in images] == ["train"] * 5 + ["val"] * 2 + ["test"] * 3
    assert [e["imgid"] for e in images] == list(range(10))
    for e in images:
        assert (root / e["filepath"] / e["filename"]).is_file()
        assert len(e["sentences"]) == 5 and all(s["raw"] for s in e["sentences"])
        assert "domain" not in e
    scenes = load_scenes(root / "scenes.json")
    assert set(scenes) == {Path(e["filename"]).stem for e in images}
    assert all(scenes[Path(e["filename"]).stem] == Scene.from_dict(e["scene"]) for e in images)
    assert len((root / "corpus.txt").read_text().splitlines()) == 30
    # ViECap's vocabulary: every single-word shape noun, synonyms and held-out words included
    entities = (root / "entities.txt").read_text().split()
    assert {"circle", "disc", "box", "moon", "pentagon"} <= set(entities)
    assert "plus sign" not in entities and len(entities) == len(set(entities))

    before = read_tree(root)
    (root / "images" / "val_000001.png").unlink()
    (root / "corpus.txt").unlink()
    small_world(tmp_path / "w", n_train_images=5, n_val=2, n_test=3, n_corpus=30)
    assert read_tree(root) == before
    # a whole world is returned as it is, without sampling it again
    import pairfree.world.export as export

    monkeypatch.setattr(export, "render_scene", None)
    monkeypatch.setattr(WorldConfig, "sample_scene", None)
    assert small_world(tmp_path / "w", n_train_images=5, n_val=2, n_test=3, n_corpus=30) == root
    assert read_tree(root) == before
    (root / "entities.txt").unlink()  # a world made before the file existed gets it
    small_world(tmp_path / "w", n_train_images=5, n_val=2, n_test=3, n_corpus=30)
    assert read_tree(root) == before
    with pytest.raises(PairfreeError, match="other parameters"):
        small_world(tmp_path / "w", n_train_images=5, n_val=2, n_test=3, n_corpus=31)


def test_load_scenes_names_bad_items(tmp_path):
    good = Scene((obj("circle", "red"),)).to_dict()
    path = tmp_path / "scenes.json"
    path.write_text(json.dumps({"ok": good, "bad": {"objects": [{"shape": "blob"}]}}))
    with pytest.raises(BadInputError, match="id bad"):
        load_scenes(path)
    log = SkipLog()
    assert list(load_scenes(path, skip_log=log)) == ["ok"] and len(log) == 1
    path.write_text("{not json")
    with pytest.raises(BadInputError, match="scenes.json:1"):
        load_scenes(path)


def test_world_config_validation():
    with pytest.raises(PairfreeError, match="unknown world preset"):
        world_preset("mars")
    with pytest.raises(ValueError, match="unknown shape"):
        WorldConfig(shapes={"blob": 1.0})
    with pytest.raises(ValueError, match="not in use"):
        WorldConfig(held_out=("cyan",))
    with pytest.raises(ValueError, match="cannot fill"):
        WorldConfig(shapes={"circle": 1.0}, colors={"red": 1.0}, object_counts={2: 1.0})
