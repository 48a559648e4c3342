"""Confidence intervals and paired comparisons: known answers on constructed scores, per-image
CIDEr that averages to the corpus score, and ``pairfree compare`` on prediction files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from pairfree.cli import main
from pairfree.errors import PairfreeError
from pairfree.evaluate import caption_metrics
from pairfree.evaluate.coco import per_image_scores
from pairfree.evaluate.stats import (
    VarianceParts,
    bootstrap_mean,
    paired_bootstrap,
    variance_parts,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")


def test_bootstrap_interval_of_a_mean_has_the_textbook_standard_error():
    rng = np.random.default_rng(1)
    scores = rng.normal(100.0, 20.0, size=2000)
    interval = bootstrap_mean(scores, resamples=2000)
    expected = scores.std(ddof=1) / np.sqrt(len(scores))  # 0.45
    assert interval.mean == pytest.approx(scores.mean())
    assert interval.stderr == pytest.approx(expected, rel=0.1)
    assert interval.high - interval.low == pytest.approx(2 * 1.96 * expected, rel=0.1)
    assert interval.low < scores.mean() < interval.high


def test_identical_methods_differ_by_exactly_nothing():
    scores = np.random.default_rng(2).uniform(0, 300, size=(3, 200))
    c = paired_bootstrap(scores, scores.copy(), resamples=500)
    assert (c.difference.mean, c.difference.low, c.difference.high) == (0.0, 0.0, 0.0)
    assert c.p_value == 1.0 and not c.significant
    assert (c.n_seeds, c.n_images) == (3, 200)


def test_a_strictly_better_method_is_ahead_with_its_difference_inside_the_interval():
    rng = np.random.default_rng(3)
    b = rng.uniform(0, 300, size=(2, 300))
    a = b + 5.0 + rng.normal(0, 2.0, size=b.shape)
    c = paired_bootstrap(a, b, resamples=1000)
    assert c.significant and c.difference.low > 0
    assert c.difference.low < 5.0 < c.difference.high
    assert c.p_value < 0.01


def test_pairing_finds_a_small_difference_that_the_separate_intervals_hide():
    """Image difficulty dominates both methods' scores; the paired difference cancels it."""
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0, 300, size=(1, 400))
    a, b = difficulty + 2.0 + rng.normal(0, 1, difficulty.shape), difficulty
    c = paired_bootstrap(a, b, resamples=1000)
    assert c.a.low < c.b.high  # the two methods' own intervals overlap ...
    assert c.significant  # ... yet A is ahead on the same images


def test_seeds_that_disagree_widen_the_interval():
    """+4 on one seed and -2 on the other: images alone would call it; seeds do not."""
    rng = np.random.default_rng(5)
    b = rng.uniform(0, 300, size=(2, 1000))
    a = b + np.array([[4.0], [-2.0]]) + rng.normal(0, 0.5, size=b.shape)
    one_seed = paired_bootstrap(a[:1], b[:1], resamples=1000)
    both = paired_bootstrap(a, b, resamples=1000)
    assert one_seed.significant
    assert not both.significant and both.difference.low < 0 < both.difference.high


def test_bad_shapes_and_settings_are_refused():
    with pytest.raises(PairfreeError, match="same seeds and images"):
        paired_bootstrap(np.zeros((2, 5)), np.zeros((2, 6)))
    with pytest.raises(PairfreeError, match="finite"):
        bootstrap_mean([1.0, float("nan")])
    with pytest.raises(PairfreeError, match="resamples"):
        bootstrap_mean([1.0, 2.0], resamples=10)
    with pytest.raises(PairfreeError, match="confidence"):
        bootstrap_mean([1.0, 2.0], confidence=95)


SHAPES = ("circle", "square", "triangle", "star", "heart", "cross")
COLORS = ("red", "green", "blue", "white", "purple", "yellow")


def _scenes(n: int) -> dict[str, list[str]]:
    refs = {}
    for i in range(n):
        color, shape = COLORS[i % 6], SHAPES[(i // 6) % 6]
        refs[str(100 + i)] = [
            f"a {color} {shape} on a plain background.",
            f"there is a {color} {shape}.",
            f"a picture of a {color} {shape} in the middle.",
        ]
    return refs


@needs_java
def test_per_image_cider_averages_to_the_corpus_score():
    refs = _scenes(12)
    preds = {i: f"a {r[0].split()[1]} shape" for i, r in refs.items()}
    per_image = per_image_scores(preds, refs, metric="CIDEr")
    assert set(per_image) == set(refs)
    corpus = caption_metrics(preds, refs, metrics=["CIDEr"])["CIDEr"]
    assert np.mean(list(per_image.values())) == pytest.approx(corpus)
    with pytest.raises(PairfreeError, match="BLEU"):
        per_image_scores(preds, refs, metric="BLEU")


def _write(path, obj):
    path.write_text(json.dumps(obj), encoding="utf-8")
    return path


@pytest.fixture
def world(tmp_path):
    refs = _scenes(36)
    images = [
        {"filepath": "val2014", "filename": f"{i}.jpg", "cocoid": int(i), "split": "test",
         "sentences": [{"raw": r} for r in texts]}
        for i, texts in refs.items()
    ]  # fmt: skip
    references = _write(tmp_path / "dataset_coco.json", {"images": images})
    good = [{"image_id": int(i), "caption": r[1]} for i, r in refs.items()]
    bad = [{"image_id": int(i), "caption": "a thing"} for i in refs]
    return references, good, bad


@needs_java
def test_compare_command_finds_the_better_method_and_writes_json(world, tmp_path, capsys):
    references, good, bad = world
    a0, a1 = _write(tmp_path / "a0.json", good), _write(tmp_path / "a1.json", good)
    (tmp_path / "run_b").mkdir()
    _write(tmp_path / "run_b" / "captions_test.json", bad)
    b1 = _write(tmp_path / "b1.json", bad)
    out = tmp_path / "cmp.json"
    code = main(["compare", f"{a0},{a1}", f"{tmp_path / 'run_b'},{b1}", str(references),
                 "--names", "good,bad", "--resamples", "500", "--out", str(out)])  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert "36 images x 2 seed(s)" in printed and "A is ahead" in printed
    result = json.loads(out.read_text())
    assert result["difference"]["low"] > 0 and result["n_seeds"] == 2
    assert result["predictions"]["bad"][0].endswith("captions_test.json")


@needs_java
def test_compare_command_calls_identical_files_a_tie(world, tmp_path, capsys):
    references, good, _ = world
    a = _write(tmp_path / "a.json", good)
    assert main(["compare", str(a), str(a), str(references), "--resamples", "200"]) == 0
    assert "a tie at this confidence" in capsys.readouterr().out


@needs_java
def test_compare_command_refuses_unpaired_inputs_naming_them(world, tmp_path, capsys):
    references, good, bad = world
    a = _write(tmp_path / "a.json", good)
    short = _write(tmp_path / "short.json", bad[:-1])
    assert main(["compare", str(a), str(short), str(references)]) == 2
    err = capsys.readouterr().err
    assert "B seed 0 does not caption the same images" in err and "'135'" in err
    assert main(["compare", f"{a},{a}", str(a), str(references)]) == 2
    assert "A has 2, B has 1" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path), str(references)]) == 2
    assert "without captions_test.json" in capsys.readouterr().err
    assert main(["compare", str(a), str(tmp_path / "nope.json"), str(references)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", str(a), str(a), str(references), "--confidence", "95"])
    assert "between 0 and 1" in capsys.readouterr().err


def test_the_world_table_marks_a_real_difference_and_gives_its_standard_error():
    from bench.world import BASELINE, cider_cells

    rng = np.random.default_rng(0)
    base = rng.uniform(0, 100, size=(2, 200))
    per_image = {(BASELINE, "s"): base.tolist(), ("better", "s"): (base + 5).tolist(),
                 ("same", "s"): base.tolist()}  # fmt: skip
    cell, difference, stderr = cider_cells(per_image, "better", "s")
    assert difference.startswith("+5.0") and difference.endswith("*")
    assert stderr == pytest.approx(0.0, abs=1e-9)  # the same +5 on every image
    _, same, _ = cider_cells(per_image, "same", "s")
    assert not same.endswith("*")
    assert cider_cells(per_image, BASELINE, "s")[1:] == ("", None)


def test_the_world_table_joins_earlier_runs_tables(tmp_path, capsys):
    from bench.world import BASELINE, print_table, read_tables

    def row(method, cider, seconds=None):
        return {"method": method, "setting": "s", "scores": [{"CIDEr": cider}] * 2,
                "per_image_cider": [[cider] * 50, [cider] * 50], "train_seconds": seconds}  # fmt: skip

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([row(BASELINE, 1.0), row("SaCap", 9.0, [3.0, 5.0])]))
    b.write_text(json.dumps([row(BASELINE, 5.0, [2.0, 2.0])]))  # a rerun of the baseline
    scores, seconds, per_image = read_tables([str(a), str(b)])
    assert per_image[(BASELINE, "s")][0][0] == 5.0 and seconds == {"SaCap": [3.0, 5.0],
                                                                   BASELINE: [2.0, 2.0]}  # fmt: skip
    print_table(scores, seconds, per_image)
    sacap = next(line for line in capsys.readouterr().out.splitlines() if "| SaCap |" in line)
    assert "+4.0 [+4.0, +4.0]*" in sacap and sacap.rstrip().endswith("| 4 |")


def test_the_world_table_compares_each_ablation_with_its_own_recipe(capsys):
    from bench.world import print_within_recipes

    rng = np.random.default_rng(1)
    full = rng.uniform(0, 100, size=(2, 100))
    per_image = {("SaCap", "s"): full.tolist(),
                 ("SaCap without re-pairing", "s"): (full - 7).tolist(),
                 ("SaCap without soft prompt", "s"): full.tolist(),
                 ("CgT-GAN: its text-only init", "s"): full.tolist(),
                 ("CgT-GAN", "s"): (full + 3).tolist(),
                 ("ICSD, single-context images", "s"): full.tolist(),
                 ("paired upper bound (ClipCap)", "s"): (full + 2).tolist()}  # fmt: skip
    print_within_recipes(per_image)
    lines = capsys.readouterr().out.splitlines()
    row = {line.split(" | ")[0].lstrip("| "): line for line in lines}
    assert "-7.0 [-7.0, -7.0]*" in row["SaCap without re-pairing − SaCap"]
    assert "+0.0 [+0.0, +0.0] |" in row["SaCap without soft prompt − SaCap"]  # a tie, no *
    assert "+3.0 [+3.0, +3.0]*" in row["CgT-GAN − CgT-GAN: its text-only init"]
    assert not any("ICSD" in line for line in lines)  # its full recipe is not in the table
    # the full recipes against the paired upper bound too, ablations and inits not
    assert "-2.0 [-2.0, -2.0]*" in row["SaCap − paired upper bound (ClipCap)"]
    assert "+1.0 [+1.0, +1.0]*" in row["CgT-GAN − paired upper bound (ClipCap)"]
    assert sum("− paired upper bound" in line for line in lines) == 2


def test_variance_parts_recover_known_image_seed_and_noise_parts():
    rng = np.random.default_rng(0)
    seeds, images = 200, 400
    d = (5 + rng.normal(0, 10, (seeds, 1)) + rng.normal(0, 30, (1, images))
         + rng.normal(0, 100, (seeds, images)))  # fmt: skip
    parts = variance_parts(d)
    assert parts.image == pytest.approx(30, rel=0.15)
    assert parts.seed == pytest.approx(10, rel=0.2)
    assert parts.noise == pytest.approx(100, rel=0.05)
    # the formula is the spread of the mean over fresh draws of all three parts
    means = [(rng.normal(0, 10, (2, 1)) + rng.normal(0, 30, (1, 50))
              + rng.normal(0, 100, (2, 50))).mean() for _ in range(4000)]  # fmt: skip
    assert parts.stderr(50, 2) == pytest.approx(float(np.std(means)), rel=0.1)
    with pytest.raises(PairfreeError, match="at least 2 seeds"):
        variance_parts(d[:1])


def test_the_plan_is_the_fewest_seeds_that_reach_the_target_error():
    parts = VarianceParts(image=0.0, seed=6.0, noise=100.0)
    seeds, images = parts.plan(3.0)
    assert seeds == 5  # 6² / 4 = 9 leaves the images nothing; 6² / 5 = 7.2 does not
    assert parts.stderr(images, seeds) <= 3.0 < parts.stderr(images - 1, seeds)
    assert VarianceParts(image=0.0, seed=30.0, noise=1.0).plan(3.0, max_seeds=32) is None


def test_the_world_table_says_what_would_bring_its_error_to_3_cider(capsys):
    from bench.world import BASELINE, print_plan

    rng = np.random.default_rng(2)
    base = rng.uniform(0, 300, size=(3, 300))
    noisy = base + rng.normal(0, 60, size=(3, 300))  # no image or seed part: images suffice
    print_plan({(BASELINE, "s"): base.tolist(), ("other", "s"): noisy.tolist()})
    line = capsys.readouterr().out
    images = int(line.split(" test images")[0].rsplit(" ", 1)[1])
    assert "with 1 seed\n" in line and images == pytest.approx(400, rel=0.2)  # 60² / 3²
