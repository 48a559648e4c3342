"""CHAIR (Rohrbach et al., EMNLP 2018): a hand-computed example, the paper's ground truth (the
instances plus the references' objects), the COCO instances reader's errors, and
``pairfree evaluate --instances`` end to end."""

from __future__ import annotations

import json
import math

import pytest

from pairfree.cli import main
from pairfree.errors import BadInputError, PairfreeError
from pairfree.evaluate import evaluate
from pairfree.evaluate.chair import (
    COCO_SYNONYMS,
    chair_scores,
    ground_truth,
    object_mentions,
    read_coco_instances,
)

CAPTIONS = {
    1: "A man and a woman eating hot dogs at a table.",
    2: "Two dogs chasing a dog near a teddy bear.",
    3: "A cell-phone on a toilet seat.",
    4: "A view of the sky.",
}
INSTANCES = {1: {"person", "hot dog"}, 2: {"teddy bear"}, 3: {"toilet", "cell phone"}, 4: set()}


def test_the_80_coco_categories_each_name_themselves_and_no_phrase_names_two():
    assert len(COCO_SYNONYMS) == 80
    phrases = [p for category, words in COCO_SYNONYMS.items() for p in {category, *words}]
    assert len(phrases) == len(set(phrases))
    for category in COCO_SYNONYMS:
        assert object_mentions(f"there is a {category} here") == [category]


def test_mentions_longest_phrase_first_plurals_and_the_papers_special_cases():
    assert object_mentions(CAPTIONS[1]) == ["person", "person", "hot dog", "dining table"]
    assert object_mentions(CAPTIONS[2]) == ["dog", "dog", "teddy bear"]
    assert object_mentions(CAPTIONS[3]) == ["cell phone", "toilet"]  # not a chair
    assert object_mentions(CAPTIONS[4]) == []
    assert object_mentions("the seat of the toilet") == ["toilet"]
    assert object_mentions("a seat by the window") == ["chair"]
    assert object_mentions("a baby elephant beside a baby") == ["elephant", "person"]
    assert object_mentions("People riding BIKES past knives and mice") == [
        "person", "bicycle", "knife", "mouse"
    ]  # fmt: skip
    assert object_mentions("a snowman on a catwalk") == []  # whole words only


def test_chair_equals_the_hand_computed_example():
    """Mentions: 4 (person twice, hot dog, table: the table is hallucinated), 3 (dog twice,
    both hallucinated, and the teddy bear), 2 (none), 0. CHAIR-i = 3 / 9, CHAIR-s = 2 / 4."""
    scores = chair_scores(CAPTIONS, INSTANCES)
    assert scores["CHAIR_i"] == pytest.approx(100 * 3 / 9)
    assert scores["CHAIR_s"] == 50.0
    assert (scores["chair_mentions"], scores["chair_hallucinated_mentions"]) == (9.0, 3.0)
    assert (scores["chair_captions"], scores["chair_hallucinated_captions"]) == (4.0, 2.0)

    nothing_named = chair_scores({4: CAPTIONS[4]}, INSTANCES)
    assert math.isnan(nothing_named["CHAIR_i"]) and nothing_named["CHAIR_s"] == 0.0
    with pytest.raises(BadInputError, match="no object annotations for image ids '5'"):
        chair_scores({5: "a dog"}, INSTANCES)


def test_objects_the_references_mention_join_the_ground_truth():
    references = {1: ["People at a dining table.", "Two people eat."], 2: ["A teddy bear."]}
    truth = ground_truth(INSTANCES, references)
    assert truth["1"] == {"person", "hot dog", "dining table"}
    assert truth["2"] == {"teddy bear"} and truth["4"] == set()
    assert INSTANCES[1] == {"person", "hot dog"}  # the caller's sets are left alone
    scores = chair_scores(CAPTIONS, truth)
    assert scores["CHAIR_i"] == pytest.approx(100 * 2 / 9)  # the table is no longer made up
    assert scores["CHAIR_s"] == 25.0
    assert ground_truth(INSTANCES, None)["1"] == {"person", "hot dog"}


def _write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


def _instances():
    return {
        "images": [{"id": 11}, {"id": 12}, {"id": 13}],
        "annotations": [
            {"image_id": 11, "category_id": 18},
            {"image_id": 11, "category_id": 18},
            {"image_id": 11, "category_id": 62},
            {"image_id": 12, "category_id": 17},
        ],
        "categories": [{"id": 17, "name": "cat"}, {"id": 18, "name": "dog"},
                       {"id": 62, "name": "chair"}],
    }  # fmt: skip


def test_read_coco_instances_and_its_errors(tmp_path):
    path = _write(tmp_path / "instances_val2014.json", _instances())
    assert read_coco_instances(path) == {"11": {"dog", "chair"}, "12": {"cat"}, "13": set()}

    bad = _instances()
    del bad["categories"]
    with pytest.raises(BadInputError, match=r"instances_bad\.json.*no 'categories'"):
        read_coco_instances(_write(tmp_path / "instances_bad.json", bad))
    bad = _instances()
    del bad["annotations"][2]["category_id"]
    with pytest.raises(BadInputError, match=r"annotations\[2\]: missing 'category_id'"):
        read_coco_instances(_write(tmp_path / "b.json", bad))
    bad = _instances()
    bad["annotations"][0]["image_id"] = 99
    with pytest.raises(BadInputError, match=r"annotations\[0\]: image_id 99 is not in images"):
        read_coco_instances(_write(tmp_path / "c.json", bad))
    bad = _instances()
    bad["annotations"][3]["category_id"] = 5
    with pytest.raises(BadInputError, match=r"category_id 5 is not in categories"):
        read_coco_instances(_write(tmp_path / "d.json", bad))
    with pytest.raises(BadInputError, match="expected a COCO instances object"):
        read_coco_instances(_write(tmp_path / "e.json", [1, 2]))


def test_evaluate_command_adds_chair_from_an_instances_file(tmp_path, monkeypatch, capsys):
    """End to end through the CLI; the COCO metrics are stubbed out (they are tested in
    test_evaluate.py and need Java), so what is checked is CHAIR and its wiring."""
    monkeypatch.setattr("pairfree.evaluate.report.caption_metrics", lambda *a, **k: {})
    refs = {11: ["a dog on a chair.", "a puppy sitting."], 12: ["a cat."], 13: ["a field."]}
    images = [
        {"filepath": "val2014", "filename": f"{i}.jpg", "cocoid": i, "split": "test",
         "sentences": [{"raw": r} for r in texts]}
        for i, texts in refs.items()
    ]  # fmt: skip
    references = _write(tmp_path / "dataset_coco.json", {"images": images})
    instances = _write(tmp_path / "instances_val2014.json", _instances())
    predictions = _write(
        tmp_path / "preds.json",
        [{"image_id": 11, "caption": "two dogs and a cat"},  # the cat is made up
         {"image_id": 12, "caption": "a cat on a couch"},  # so is the couch
         {"image_id": 13, "caption": "a grassy field"}],
    )  # fmt: skip
    argv = ["evaluate", str(predictions), str(references), "--instances", str(instances)]
    assert main(argv) == 0
    assert "CHAIR-i | CHAIR-s" in capsys.readouterr().out
    scores = json.loads((tmp_path / "preds.scores.json").read_text())["scores"]["overall"]
    assert scores["CHAIR_i"] == 50.0  # 4 mentions ("two dogs" is one), 2 made up
    assert scores["CHAIR_s"] == pytest.approx(100 * 2 / 3)

    # a reference that names the couch makes it true (the paper's ground truth) unless the
    # instances alone are asked for
    refs[12].append("a cat curled up on a couch.")
    images[1]["sentences"].append({"raw": refs[12][-1]})
    _write(references, {"images": images})
    out = tmp_path / "union"
    assert main([*argv, "--out", str(out)]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["scores"]["overall"]["CHAIR_s"] == (
        pytest.approx(100 / 3)
    )
    out = tmp_path / "instances_only"
    assert main([*argv, "--out", str(out), "--chair-instances-only"]) == 0
    assert json.loads(out.with_suffix(".json").read_text())["scores"]["overall"]["CHAIR_s"] == (
        pytest.approx(200 / 3)
    )

    smaller = _instances()
    smaller["images"] = smaller["images"][:2]
    _write(instances, smaller)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "missing")]) == 2
    assert "no instance annotations for image ids '13'" in capsys.readouterr().err


def test_evaluate_refuses_images_without_annotations_before_scoring():
    with pytest.raises(PairfreeError, match="CHAIR: no instance annotations.*'2'"):
        evaluate(
            [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "a cat"}],
            {"1": ["a dog"], "2": ["a cat"]},
            instances={"1": {"dog"}},
        )
