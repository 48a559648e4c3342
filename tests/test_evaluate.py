"""Caption evaluation: equality with pycocoevalcap's COCOEvalCap, SPICE availability, CLIPScore
by its formula, NoCaps domains and the report. Java runs the PTB tokenizer and METEOR; METEOR
takes ~10 s to start, so only the two module fixtures run it."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import zipfile

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pairfree.errors import PairfreeError
from pairfree.evaluate import (
    EvaluationReport,
    caption_metrics,
    clip_scores,
    evaluate,
    nocaps_metrics,
    spice_status,
)
from pairfree.evaluate.coco import nocaps_groups
from pairfree.evaluate.spice import CORENLP_JARS, SPICE_JAR, default_spice_dir

# Java runs pycocoevalcap's PTB tokenizer and METEOR. A machine without it skips the tests that
# need it; CI (CI=true) never does, so a CI machine without Java fails instead of passing quietly.
IN_CI = os.environ.get("CI") == "true"
needs_java = pytest.mark.skipif(
    shutil.which("java") is None and not IN_CI, reason="pycocoevalcap needs Java"
)

PREDICTIONS = {
    "522418": "A woman cutting a large cake with a knife.",
    "391895": "A man riding a bike down a dirt road.",
    "184613": "A boy holding an umbrella next to cows.",
    "318219": "A café with tables and chairs on the sidewalk — très jolie.",
    "554625": "a dog sleeping on a couch",
}
REFERENCES = {
    "391895": [
        "A man with a red helmet on a small moped on a dirt road.",
        "Man riding a motor bike on a dirt road on the countryside.",
        "A man riding on the back of a motorcycle.",
        "A man in a red shirt and a red hat is on a motorcycle on a hill side.",
    ],
    "522418": [
        "A woman wearing a net on her head cutting a cake.",
        "A woman cutting a large white sheet cake.",
        "A woman wearing a hair net cutting a large sheet cake.",
        "there is a woman that is cutting a white cake",
    ],
    "184613": [
        "A child holding a flowered umbrella and petting a yak.",
        "A young man holding an umbrella next to a herd of cattle.",
        "a young boy barefoot holding an umbrella touching the horn of a cow",
    ],
    "318219": [
        "Tables and chairs outside a small café.",
        "A sidewalk café with empty chairs.",
        "Outdoor seating at a café in Paris.",
    ],
    "554625": [
        "A dog is asleep on the sofa.",
        "A brown dog sleeping on a couch.",
        "A puppy curled up on a couch.",
    ],
    "999999": ["An empty room with nobody in it."],  # not predicted, so never scored
}
DOMAINS = {
    "391895": "in-domain",
    "522418": "in-domain",
    "184613": "near-domain",
    "318219": "out-domain",
    "554625": "near-domain",
}
FAST = ("BLEU", "ROUGE_L", "CIDEr")  # no METEOR: its JVM start dominates a test's time
ALL_KEYS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE"]


@pytest.fixture(scope="module")
def no_spice_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("no-spice")


@pytest.fixture(scope="module")
def ours(no_spice_dir):
    return caption_metrics(PREDICTIONS, REFERENCES, spice_dir=no_spice_dir)


class _NoSpice:
    """Stands in for COCOEvalCap's Spice scorer, which would try to download CoreNLP."""

    def compute_score(self, gts, res):
        return math.nan, [math.nan] * len(res)

    def method(self):
        return "SPICE"


@pytest.fixture(scope="module")
def coco_eval():
    """COCOEvalCap.evaluate itself, on COCO objects built in memory, Spice stubbed out."""
    from pycocoevalcap import eval as coco_eval_module
    from pycocotools.coco import COCO

    coco = COCO()
    pairs = [(int(i), ref) for i in PREDICTIONS for ref in REFERENCES[i]]
    coco.dataset = {
        "images": [{"id": int(i)} for i in PREDICTIONS],
        "annotations": [
            {"id": n, "image_id": i, "caption": c} for n, (i, c) in enumerate(pairs, start=1)
        ],
    }
    coco.createIndex()
    results = coco.loadRes([{"image_id": int(i), "caption": c} for i, c in PREDICTIONS.items()])
    evaluator = coco_eval_module.COCOEvalCap(coco, results)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(coco_eval_module, "Spice", _NoSpice)
        evaluator.evaluate()
    return evaluator.eval


@needs_java
def test_caption_metrics_equal_cocoevalcap(ours, coco_eval):
    assert list(ours) == ALL_KEYS
    assert set(coco_eval) == set(ALL_KEYS)
    for key in ALL_KEYS[:-1]:
        assert ours[key] == pytest.approx(100 * coco_eval[key], rel=1e-9), key
    assert 0 < ours["Bleu_4"] < ours["Bleu_1"] < 100
    assert ours["CIDEr"] > 0


@needs_java
def test_perfect_prediction_gets_bleu4_100():
    refs = {"1": ["a man riding a horse on the beach"] * 3, "2": ["two dogs play in the snow"] * 3}
    # The line break must not shift captions between images in the line-based tokenizer.
    preds = {"1": "A man riding a horse\r\non the beach.", "2": "Two dogs play in the snow"}
    scores = caption_metrics(preds, refs, metrics=("BLEU",))
    assert list(scores) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4"]
    assert scores["Bleu_4"] == pytest.approx(100.0, abs=1e-4)


@needs_java
def test_spice_unavailable_without_jars(ours, no_spice_dir):
    available, message = spice_status(no_spice_dir)
    assert not available
    assert SPICE_JAR in message

    fake = no_spice_dir / "spice-without-corenlp"
    (fake / "lib").mkdir(parents=True)
    (fake / SPICE_JAR).write_bytes(b"")
    available, message = spice_status(fake)
    assert not available
    assert message.startswith("SPICE unavailable")
    assert all(jar in message for jar in CORENLP_JARS)
    assert str(fake / "lib") in message and "stanford-corenlp-full-2015-12-09.zip" in message

    assert ours["SPICE"] is None
    assert all(isinstance(ours[key], float) for key in ALL_KEYS[:-1])


_FAKE_SPICE = """
import java.io.*;
import org.json.simple.*;
import org.json.simple.parser.JSONParser;

public class FakeSpice {
    public static void main(String[] args) throws Exception {
        String out = null;
        for (int i = 0; i < args.length; i++) if (args[i].equals("-out")) out = args[i + 1];
        JSONArray items = (JSONArray) new JSONParser().parse(new FileReader(args[0]));
        JSONArray results = new JSONArray();
        for (Object o : items) {
            JSONObject item = (JSONObject) o;
            double f = ((JSONArray) item.get("refs")).contains(item.get("test")) ? 1.0 : 0.0;
            JSONObject all = new JSONObject();
            all.put("f", f);
            JSONObject scores = new JSONObject();
            scores.put("All", all);
            JSONObject result = new JSONObject();
            result.put("image_id", item.get("image_id"));
            result.put("scores", scores);
            results.add(result);
        }
        try (Writer w = new FileWriter(out)) { w.write(results.toJSONString()); }
    }
}
"""


@pytest.mark.skipif(
    shutil.which("javac") is None and not IN_CI, reason="needs javac to build a stand-in jar"
)
@needs_java
def test_spice_runs_when_jars_present(tmp_path):
    """A stand-in spice-1.0.jar (F = 1 when the tokenized candidate equals a reference) checks
    the plumbing: status, input file, per-image results mapped back to ids, domain means."""
    spice_dir, lib = tmp_path / "spice", tmp_path / "spice" / "lib"
    lib.mkdir(parents=True)
    json_simple = default_spice_dir() / "lib" / "json-simple-1.1.1.jar"
    shutil.copy(json_simple, lib)
    for jar in CORENLP_JARS:
        (lib / jar).write_bytes(b"")
    (tmp_path / "FakeSpice.java").write_text(_FAKE_SPICE)
    subprocess.run(
        ["javac", "-nowarn", "-cp", str(json_simple), "-d", str(tmp_path), "FakeSpice.java"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    manifest = (
        "Manifest-Version: 1.0\nMain-Class: FakeSpice\nClass-Path: lib/json-simple-1.1.1.jar\n"
    )
    with zipfile.ZipFile(spice_dir / SPICE_JAR, "w") as jar:
        jar.writestr("META-INF/MANIFEST.MF", manifest)
        jar.write(tmp_path / "FakeSpice.class", "FakeSpice.class")
    assert spice_status(spice_dir)[0]

    preds = {"a": "A dog, on a couch.", "b": "a cat", "c": "a bird", "d": "Two cows!"}
    refs = {"a": ["a dog on a couch"], "b": ["a dog"], "c": ["a fish"], "d": ["two cows"]}
    domains = {"a": "in-domain", "b": "in-domain", "c": "near-domain", "d": "out-domain"}
    scores = nocaps_metrics(preds, refs, domains, metrics=("SPICE",), spice_dir=spice_dir)
    assert scores == {
        "in-domain": {"SPICE": 50.0},
        "near-domain": {"SPICE": 0.0},
        "out-domain": {"SPICE": 100.0},
        "overall": {"SPICE": 50.0},
    }


@needs_java
def test_nocaps_domains_split_images(ours):
    scores = nocaps_metrics(PREDICTIONS, REFERENCES, DOMAINS, metrics=FAST)
    assert list(scores) == ["in-domain", "near-domain", "out-domain", "overall"]
    for key, value in scores["overall"].items():
        assert value == pytest.approx(ours[key], rel=1e-9), key
    for domain in ("in-domain", "near-domain", "out-domain"):
        subset = {i: c for i, c in PREDICTIONS.items() if DOMAINS[i] == domain}
        alone = caption_metrics(subset, REFERENCES, metrics=FAST)
        assert scores[domain] == pytest.approx(alone, rel=1e-9), domain
    assert scores["in-domain"]["CIDEr"] != pytest.approx(scores["overall"]["CIDEr"])


def test_nocaps_groups_reject_missing_or_unknown_domains():
    assert nocaps_groups(["1", "2"], {1: "out-domain", 2: "in-domain"}) == {
        "in-domain": ["2"],
        "near-domain": [],
        "out-domain": ["1"],
        "overall": ["1", "2"],
    }
    with pytest.raises(PairfreeError, match="'2'"):
        nocaps_groups(["1", "2"], {"1": "in-domain"})
    with pytest.raises(PairfreeError, match="'far-domain'"):
        nocaps_groups(["1"], {"1": "far-domain"})


class FakeClip:
    """Fixed, un-normalized vectors: images keyed by their red value, texts by full text."""

    name = "fake"
    embed_dim = 3

    def __init__(self, image_vectors, text_vectors):
        self.image_vectors, self.text_vectors = image_vectors, text_vectors

    def encode_images(self, images, *, normalize=False, batch_size=64):
        x = torch.tensor([self.image_vectors[im.getpixel((0, 0))[0]] for im in images])
        return F.normalize(x, dim=-1) if normalize else x

    def encode_texts(self, texts, *, normalize=False, batch_size=256):
        x = torch.tensor([self.text_vectors[t] for t in texts])
        return F.normalize(x, dim=-1) if normalize else x


CLIP_IMAGES = {"a": [1.0, 0.0, 0.0], "b": [0.0, 0.0, 2.0], "c": [0.0, 1.0, 0.0]}
CLIP_CANDIDATES = {"a": "a red ball", "b": "a cube", "c": "two cats"}
CLIP_REFERENCES = {"a": ["a ball", "a toy"], "b": ["a box"], "c": ["a bird"]}
CLIP_TEXTS = {  # keys carry the "A photo depicts " prefix, or the lookup fails
    "A photo depicts a red ball": [3.0, 4.0, 0.0],  # cos(image a) = 0.6
    "A photo depicts a ball": [0.0, 2.0, 0.0],  # cos(candidate a) = 0.8
    "A photo depicts a toy": [-1.0, 0.0, 0.0],  # cos(candidate a) = -0.6
    "A photo depicts a cube": [0.0, 0.0, -1.0],  # cos(image b) = -1
    "A photo depicts a box": [0.0, 0.0, -3.0],  # cos(candidate b) = 1
    "A photo depicts two cats": [0.0, 1.0, 1.0],  # cos(image c) = 1/sqrt(2)
    "A photo depicts a bird": [0.0, -1.0, -1.0],  # cos(candidate c) = -1
}
# By hand: CLIP-S = 2.5 * max(cos, 0): a 1.5, b 0, c 2.5/sqrt(2).
# RefCLIP-S = H-mean(CLIP-S, max(best ref cos, 0)): a 2*1.5*0.8/2.3, b H(0, 1) = 0, c H(., 0) = 0.
CLIP_S = {"a": 1.5, "b": 0.0, "c": 2.5 / math.sqrt(2)}
REF_CLIP_S = {"a": 2 * 1.5 * 0.8 / 2.3, "b": 0.0, "c": 0.0}


def _clip_images():
    return {i: Image.new("RGB", (4, 4), (n, 0, 0)) for n, i in enumerate(CLIP_IMAGES)}


def test_clip_scores_follow_formula():
    clip = FakeClip({n: v for n, v in enumerate(CLIP_IMAGES.values())}, CLIP_TEXTS)
    ids = list(CLIP_IMAGES)
    images, cands = _clip_images(), [CLIP_CANDIDATES[i] for i in ids]
    scores = clip_scores(clip, [images[i] for i in ids], cands, [CLIP_REFERENCES[i] for i in ids])
    assert scores["CLIPScore"] == pytest.approx(100 * sum(CLIP_S.values()) / 3, rel=1e-6)
    assert scores["RefCLIPScore"] == pytest.approx(100 * sum(REF_CLIP_S.values()) / 3, rel=1e-6)
    assert clip_scores(clip, [images["a"]], ["a red ball"]) == pytest.approx({"CLIPScore": 150.0})
    with pytest.raises(PairfreeError, match="2 images but 1"):
        clip_scores(clip, [images["a"], images["b"]], ["a cube"])


@needs_java
def test_evaluate_nocaps_with_clip_scores_per_domain(tmp_path):
    clip = FakeClip({n: v for n, v in enumerate(CLIP_IMAGES.values())}, CLIP_TEXTS)
    predictions = [{"image_id": i, "caption": c} for i, c in CLIP_CANDIDATES.items()]
    domains = {"a": "in-domain", "b": "in-domain", "c": "out-domain"}
    report = evaluate(
        predictions,
        CLIP_REFERENCES,
        domains=domains,
        clip=clip,
        images=_clip_images(),
        metrics=("CIDEr",),
    )
    expected = {"in-domain": ["a", "b"], "out-domain": ["c"], "overall": ["a", "b", "c"]}
    for group, ids in expected.items():
        clip_s = report.scores[group]["CLIPScore"]
        assert clip_s == pytest.approx(100 * sum(CLIP_S[i] for i in ids) / len(ids), rel=1e-6)
        ref_s = report.scores[group]["RefCLIPScore"]
        assert ref_s == pytest.approx(100 * sum(REF_CLIP_S[i] for i in ids) / len(ids), rel=1e-6)
    assert report.scores["near-domain"] == {"CIDEr": None, "CLIPScore": None, "RefCLIPScore": None}
    table = report.to_markdown()
    assert "| group | C | CLIP-S | RefCLIP-S |" in table
    assert "| near-domain | n/a | n/a | n/a |" in table


@needs_java
def test_report_json_and_markdown(ours, no_spice_dir, tmp_path):
    # Integer ids against string-keyed references: ids are compared as strings.
    predictions = [{"image_id": int(i), "caption": c} for i, c in PREDICTIONS.items()]
    report = evaluate(
        predictions, REFERENCES, metrics=("BLEU", "CIDEr", "SPICE"), spice_dir=no_spice_dir
    )
    assert isinstance(report, EvaluationReport)
    overall = report.scores["overall"]
    assert list(report.scores) == ["overall"]
    assert list(overall) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr", "SPICE"]
    for key in ("Bleu_1", "Bleu_4", "CIDEr"):
        assert overall[key] == pytest.approx(ours[key], rel=1e-9)
    assert overall["SPICE"] is None
    assert any(note.startswith("SPICE unavailable") for note in report.notes)

    lines = report.to_markdown().splitlines()
    assert lines[0] == "| group | B@1 | B@4 | C | S |"
    cells = [f"{overall[k]:.1f}" for k in ("Bleu_1", "Bleu_4", "CIDEr")]
    assert lines[2] == "| overall | " + " | ".join(cells) + " | n/a |"
    assert any(line.startswith("- SPICE unavailable") for line in lines)

    json_path, md_path = report.write(tmp_path / "out" / "eval")
    assert (json_path.name, md_path.name) == ("eval.json", "eval.md")
    assert json.loads(json_path.read_text()) == report.to_json()
    assert set(report.to_json()) == {"scores", "notes"}
    assert md_path.read_text() == report.to_markdown()


@needs_java
def test_empty_caption_is_scored_with_a_note():
    predictions = [
        {"image_id": "554625", "caption": ""},
        {"image_id": "391895", "caption": "a man"},
    ]
    report = evaluate(predictions, REFERENCES, metrics=("ROUGE_L", "CIDEr"))
    assert report.notes == ["1 empty caption(s) scored as empty: image ids '554625'"]
    assert 0 < report.scores["overall"]["ROUGE_L"] < 100


def test_bad_predictions_are_errors_naming_the_id():
    with pytest.raises(PairfreeError, match=r"\(id 7\): duplicate image_id"):
        evaluate([{"image_id": 7, "caption": "a"}, {"image_id": "7", "caption": "b"}], {"7": ["a"]})
    with pytest.raises(PairfreeError, match="'caption' must be a string"):
        evaluate([{"image_id": 7, "caption": None}], {"7": ["a"]})
    with pytest.raises(PairfreeError, match="no references.*'8'"):
        caption_metrics({"7": "a dog", "8": "a cat"}, {"7": ["a dog"]})
    with pytest.raises(PairfreeError, match="lists of strings.*'7'"):
        caption_metrics({"7": "a dog"}, {"7": "a dog"})
    with pytest.raises(PairfreeError, match="unknown metrics"):
        caption_metrics({"7": "a dog"}, {"7": ["a dog"]}, metrics=("BLEU", "WER"))


@needs_java
def test_meteor_starts_its_java_process_once_per_process(monkeypatch):
    """Every scoring call reuses this process's METEOR scorer (its JVM takes 10-15 s to start),
    with the same scores a fresh one gives; a dead one is replaced."""
    import pairfree.evaluate.coco as coco

    started = []
    real = coco.Meteor

    def counting():
        started.append(1)
        return real()

    monkeypatch.setattr(coco, "Meteor", counting)
    monkeypatch.setattr(coco, "_METEOR", {})
    refs = {"1": ["a man riding a horse on the beach"], "2": ["two dogs play in the snow"]}
    preds = {"1": "a man on a horse", "2": "dogs in the snow"}
    first = caption_metrics(preds, refs, metrics=("METEOR",))
    second = caption_metrics(preds, refs, metrics=("METEOR",))
    assert first == second and len(started) == 1
    scorer = coco._METEOR[os.getpid()]
    alone = scorer.compute_score({i: [r[0]] for i, r in refs.items()},
                                 {i: [p] for i, p in preds.items()})[0]  # fmt: skip
    assert first["METEOR"] == pytest.approx(100 * alone)
    scorer.meteor_p.kill()
    scorer.meteor_p.wait()
    # the replacement is a fresh scorer: the reused one's scores are a fresh one's
    assert caption_metrics(preds, refs, metrics=("METEOR",)) == first and len(started) == 2
