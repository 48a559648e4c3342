"""Inputs that name other files than they seem to: dataset file names that leave their image
root, folders whose links loop, and reference files that list an image twice."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import test_hostile_inputs as hostile
from test_hostile_inputs import copy_images, fails_with

from pairfree.cli import main

world, checkpoint = hostile.world, hostile.checkpoint  # the same tiny world and captioner


def dataset_file(folder: Path, format: str, names: list[str]) -> Path:
    """A dataset listing ``names`` (ids 1, 2, ...) with one caption each, in ``format``."""
    if format == "jsonl":
        path = folder / "dataset.jsonl"
        lines = [{"image_id": i, "image": n, "caption": "a shape"} for i, n in enumerate(names, 1)]
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
        return path
    if format == "karpathy":
        images = [
            {"filename": n, "cocoid": i, "split": "test", "sentences": [{"raw": "a shape"}]}
            for i, n in enumerate(names, 1)
        ]
        data = {"dataset": "coco", "images": images}
    else:
        data = {
            "images": [{"id": i, "file_name": n} for i, n in enumerate(names, 1)],
            "annotations": [
                {"id": i, "image_id": i, "caption": "a shape"} for i in range(1, len(names) + 1)
            ],
        }
    path = folder / f"{format}.json"
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- leaving the root
@pytest.mark.parametrize("format", ["karpathy", "coco", "jsonl"])
def test_caption_skips_dataset_files_outside_the_image_root(
    world, checkpoint, tmp_path, capsys, format
):
    root = tmp_path / "root"
    inside, above, elsewhere, target = copy_images(
        world, tmp_path, ["root/in.png", "above.png", "other/abs.png", "other/linked.png"]
    )
    (root / "link.png").symlink_to(target)
    (root / "sub").mkdir()
    names = ["in.png", "../above.png", str(elsewhere), "link.png", "sub/../../above.png"]
    dataset = dataset_file(tmp_path, format, names)
    out = tmp_path / "captions.json"
    args = ["caption", str(checkpoint), "--dataset", str(dataset), "--image-root", str(root)]
    assert main([*args, "--out", str(out), "--quiet"]) == 0
    assert [str(p["image_id"]) for p in json.loads(out.read_text())] == ["1"]
    skipped = [json.loads(line) for line in Path(f"{out}.skipped.jsonl").read_text().splitlines()]
    assert [s["id"] for s in skipped] == ["2", "3", "4", "5"]
    assert all("leads outside the image root" in s["reason"] for s in skipped)
    assert str(target) in skipped[2]["reason"]  # where the link really leads
    if format == "jsonl":
        assert [s["line"] for s in skipped] == [2, 3, 4, 5]
    else:
        assert skipped[0]["reason"].startswith("images[1]: ")
    capsys.readouterr()

    # --strict refuses in one line; --allow-outside-root reads them (a split linked elsewhere)
    fails_with(capsys, [*args, "--out", str(tmp_path / "s.json"), "--strict"], "../above.png")
    allowed = tmp_path / "allowed.json"
    assert main([*args, "--out", str(allowed), "--allow-outside-root", "--quiet"]) == 0
    assert len(json.loads(allowed.read_text())) == 5


def test_names_inside_the_root_and_a_linked_root_are_read(world, checkpoint, tmp_path):
    real = tmp_path / "real"
    copy_images(world, real, ["images/a.png", "b.png"])
    (tmp_path / "root").symlink_to(real)  # the root itself may be a link
    dataset = dataset_file(tmp_path, "jsonl", ["images/a.png", "./images/../b.png"])
    out = tmp_path / "captions.json"
    assert main(["caption", str(checkpoint), "--dataset", str(dataset), "--image-root",
                 str(tmp_path / "root"), "--out", str(out), "--quiet"]) == 0  # fmt: skip
    assert [str(p["image_id"]) for p in json.loads(out.read_text())] == ["1", "2"]
    assert not Path(f"{out}.skipped.jsonl").exists()


# --------------------------------------------------------------------------- looping links
def run_cli(capsys, *args: str) -> tuple[int, str]:
    """The CLI in this process under a 60 s alarm, so that a walk that never ends fails the
    test instead of hanging it: (exit code, stderr)."""

    def expire(*_):
        raise TimeoutError("the command ran past 60 s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(60)
    try:
        code = main(list(args))
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return code, capsys.readouterr().err


def test_folders_whose_links_loop_are_walked_once(world, checkpoint, tmp_path, capsys):
    photos = tmp_path / "photos"
    copy_images(world, photos, ["a/x.png", "b/y.png"])
    (photos / "self").symlink_to(".")  # a link to its own folder
    (photos / "a" / "to_b").symlink_to("../b")  # two links pointing at each other
    (photos / "b" / "to_a").symlink_to("../a")
    (photos / "broken.png").symlink_to("nowhere.png")
    (photos / "looping.png").symlink_to("looping.png")
    for n, argument in enumerate([photos, f"{photos}/**", f"{photos}/**/*.png"]):
        out = tmp_path / f"captions{n}.json"
        code, err = run_cli(capsys, "caption", str(checkpoint), str(argument), "--out", str(out),
                            "--quiet")  # fmt: skip
        assert code == 0, err
        assert sorted(p["image_id"] for p in json.loads(out.read_text())) == ["x", "y"]
        skipped = Path(f"{out}.skipped.jsonl").read_text().splitlines()
        reasons = {Path(json.loads(s)["source"]).name: json.loads(s)["reason"] for s in skipped}
        assert reasons["broken.png"] == "broken link; skipped"
        assert reasons["looping.png"] == "link loops; skipped"
        assert any("loops back" in r for r in reasons.values()), reasons


# --------------------------------------------------------------------------- duplicate ids
@pytest.mark.parametrize("format", ["karpathy", "coco"])
def test_references_listing_an_image_twice_are_refused(tmp_path, capsys, format):
    references = dataset_file(tmp_path, format, ["a.png", "b.png", "c.png"])
    data = json.loads(references.read_text())
    if format == "karpathy":
        data["images"][2]["cocoid"] = 1
    else:
        data["images"][2]["id"] = 1
        data["annotations"][2]["image_id"] = 1
    references.write_text(json.dumps(data))
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps([{"image_id": 1, "caption": "a shape"}]))
    line = fails_with(capsys, ["evaluate", str(predictions), str(references)],
                      str(references), "images[0] and images[2] -> '1'")  # fmt: skip
    assert "1 image ids are listed more than once" in line
    assert not list(tmp_path.glob("*.scores.*"))
    fails_with(capsys, ["compare", str(predictions), str(predictions), str(references)],
               "images[0] and images[2]")  # fmt: skip


def test_jsonl_lines_of_one_image_are_one_image_unless_they_name_two_files(tmp_path, capsys):
    references = tmp_path / "refs.jsonl"
    lines = [
        {"image_id": 1, "image": "a.png", "caption": "a red circle"},
        {"image_id": 1, "image": "a.png", "caption": "a circle"},
        {"image_id": 2, "image": "b.png", "caption": "a square"},
    ]
    references.write_text("".join(json.dumps(line) + "\n" for line in lines))
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps([{"image_id": 1, "caption": "a circle"}]))
    assert main(["evaluate", str(predictions), str(references), "--quiet"]) == 0
    capsys.readouterr()
    lines[2]["image_id"] = 1
    references.write_text("".join(json.dumps(line) + "\n" for line in lines))
    fails_with(capsys, ["evaluate", str(predictions), str(references),
                        "--out", str(tmp_path / "again")], "line 1 and line 3 -> '1'")  # fmt: skip


def test_scoring_without_images_does_not_check_their_names(tmp_path, capsys):
    references = dataset_file(tmp_path, "karpathy", ["../a.png", "/elsewhere/b.png"])
    predictions = tmp_path / "preds.json"
    predictions.write_text(json.dumps([{"image_id": 1, "caption": "a shape"}]))
    assert main(["evaluate", str(predictions), str(references)]) == 0
    assert "skipped" not in capsys.readouterr().out
