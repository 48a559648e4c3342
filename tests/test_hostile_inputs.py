"""Bad input on every command, through the real CLI entry point: each mistake ends in one line
that names it (no traceback, non-zero exit), inputs stay as they were, no partial or empty
output is left behind, and nothing is silently lost or mixed."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pairfree.cli import main
from pairfree.world import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(
        tmp_path_factory.mktemp("world"), n_train_images=0, n_val=0, n_test=4, n_corpus=24, seed=0
    )


@pytest.fixture(scope="module")
def checkpoint(world, tiny_clip_dir, tiny_gpt2_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    args = [
        f"corpus.path={world.corpus}", f"clip=hf:{tiny_clip_dir}", f"model.lm={tiny_gpt2_dir}",
        "model.prefix_length=2", "model.clip_length=2", "model.mapper_layers=1",
        f"train.output_dir={run}", "train.batch_size=8", "train.max_steps=2",
        "train.warmup_steps=1", "corpus.val_fraction=0", "generation.max_new_tokens=5",
    ]  # fmt: skip
    assert main(["train", "capdec", "--no-progress", *args]) == 0
    return run / "last"


def fails_with(capsys, argv, *fragments, code=2) -> str:
    """Run the CLI; it must exit ``code`` with one error line holding every fragment."""
    assert main(argv) == code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("pairfree")]
    assert "Traceback" not in err and len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Partial or empty files a failed command must not leave."""
    return sorted(
        str(p.relative_to(folder))
        for p in folder.rglob("*")
        if p.is_file() and (".partial" in p.name or p.stat().st_size == 0)
    )


def copy_images(world, folder: Path, names: list[str]) -> list[Path]:
    sources = sorted(world.images.glob("test_*.png"))
    paths = []
    for name, source in zip(names, sources, strict=False):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        paths.append(Path(shutil.copy(source, folder / name)))
    return paths


# --------------------------------------------------------------------------- silent losses
def test_evaluate_never_writes_over_its_inputs(world, checkpoint, tmp_path, capsys):
    preds = tmp_path / "preds.json"
    assert main(["caption", str(checkpoint), "--dataset", str(world.dataset), "--out",
                 str(preds), "--quiet"]) == 0  # fmt: skip
    before = digest(preds)
    assert main(["evaluate", str(preds), str(world.dataset), "--split", "test"]) == 0
    assert digest(preds) == before
    scores = json.loads((tmp_path / "preds.scores.json").read_text())
    assert "CIDEr" in scores["scores"]["overall"] and (tmp_path / "preds.scores.md").exists()
    capsys.readouterr()
    for out in ("preds", "preds.json"):  # a .json ending names the same prefix
        fails_with(capsys, ["evaluate", str(preds), str(world.dataset), "--out",
                            str(tmp_path / out)], "is an input")  # fmt: skip
    assert digest(preds) == before
    assert main(["evaluate", str(preds), str(world.dataset), "--split", "test", "--out",
                 str(tmp_path / "named.json"), "--quiet"]) == 0  # fmt: skip
    assert (tmp_path / "named.json").is_file() and (tmp_path / "named.md").is_file()


@pytest.mark.parametrize("names", [["a/x.png", "b/x.png"], ["7.png", "007.png"]])
def test_caption_refuses_files_that_would_share_an_image_id(
    world, checkpoint, tmp_path, capsys, names
):
    paths = copy_images(world, tmp_path / "in", names)
    out = tmp_path / "captions.json"
    line = fails_with(capsys, ["caption", str(checkpoint), str(tmp_path / "in"), "--out", str(out)],
                      "image ids")  # fmt: skip
    assert all(str(p) in line for p in paths)
    assert not out.exists() and leftovers(tmp_path) == []


def test_caption_with_nothing_captioned_fails_and_keeps_the_skip_list(checkpoint, tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    out = tmp_path / "captions.json"
    fails_with(capsys, ["caption", str(checkpoint), str(tmp_path / "in"), "--out", str(out)],
               "nothing could be captioned")  # fmt: skip
    assert not out.exists() and leftovers(tmp_path / "in") == ["empty.jpg"]
    assert not list(tmp_path.glob("*.partial*"))
    skipped = (tmp_path / "captions.json.skipped.jsonl").read_text().splitlines()
    assert len(skipped) == 2


def test_decoding_settings_the_decoder_cannot_run_fail_at_once_and_block_no_rerun(
    world, checkpoint, tmp_path, capsys
):
    images = tmp_path / "in"
    copy_images(world, images, ["a.png"])
    args = ["caption", str(checkpoint), str(images), "--out", str(tmp_path / "c.json")]
    fails_with(capsys, [*args, "--max-tokens", "100000"], "positions", "maximum caption length")
    fails_with(capsys, [*args, "--beams", "100000"], "100000 beams for a vocabulary")
    assert main([*args, "--quiet"]) == 0  # nothing was captioned under them: nothing to resume
    assert len(json.loads((tmp_path / "c.json").read_text())) == 1
    fails_with(capsys, ["caption", str(checkpoint), "--dataset", str(world.dataset), "--split",
                        "train", "--out", str(tmp_path / "t.json")],
               "no images to caption", "split train")  # fmt: skip


def test_caption_resumes_only_under_the_same_settings(
    world, checkpoint, tmp_path, capsys, monkeypatch
):
    from pairfree.pipeline import Captioner

    images = tmp_path / "in"
    copy_images(world, images, ["a.png", "b.png", "c.png"])
    once = tmp_path / "once.json"
    assert main(["caption", str(checkpoint), str(images), "--out", str(once), "--quiet"]) == 0

    real, calls = Captioner.caption, []

    def interrupted(self, batch, **kw):
        calls.append(len(batch))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, batch, **kw)

    monkeypatch.setattr(Captioner, "caption", interrupted)
    out = tmp_path / "captions.json"
    args = ["caption", str(checkpoint), str(images), "--out", str(out), "--batch-size", "1"]
    assert main([*args, "--quiet"]) == 130
    monkeypatch.setattr(Captioner, "caption", real)
    capsys.readouterr()
    fails_with(capsys, [*args, "--beams", "2"], "other settings", "generation", "delete it")
    assert main([*args, "--quiet"]) == 0
    assert "resuming: 1 images" in capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(once.read_text())


def test_encode_reports_what_it_skipped_while_reading_and_fails_on_nothing(
    tiny_clip_dir, tmp_path, capsys
):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_bytes(b'{"caption": "a red circle"}\n{not json\n{"caption": "a blue square"}\n')
    store = tmp_path / "store"
    clip = f"hf:{tiny_clip_dir}"
    assert main(["encode", "--captions", str(corpus), "--clip", clip, "--out", str(store)]) == 0
    out = capsys.readouterr().out
    assert "skipped 1 bad items (" in out and "corpus.jsonl:2: " in out and "wrote 2 text" in out
    assert len((tmp_path / "store.skipped.jsonl").read_text().splitlines()) == 1

    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"{not json\n" + '{"caption": "caf\u00e9"}\n'.encode("latin-1"))
    empty = tmp_path / "empty-store"
    fails_with(capsys, ["encode", "--captions", str(bad), "--clip", clip, "--out", str(empty)],
               "nothing to encode", "skipped 2")  # fmt: skip
    assert not empty.exists()


def test_evaluate_names_a_predictions_file_it_cannot_read(world, tmp_path, capsys):
    cases = {
        "binary.json": (b"\xff\xfe\x00", "not UTF-8 text"),
        "object.json": (b'{"image_id": "x", "caption": "y"}', "expected a JSON list"),
        "cut.json": (b'[{"image_id": "x",\n', "cut.json:2: not valid JSON"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        fails_with(capsys, ["evaluate", str(tmp_path / name), str(world.dataset)], name, fragment)
    fails_with(capsys, ["evaluate", str(tmp_path), str(world.dataset)], "is a folder")
    assert not list(tmp_path.glob("*.scores.*"))


def test_a_config_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, capsys):
    cases = {
        "broken.yaml": (b"recipe: capdec\ntrain:\n  lr: [1e-5\n", "broken.yaml:4: not valid YAML"),
        "latin1.yaml": ("recipe: capdec  # caf\u00e9\n".encode("latin-1"), "not UTF-8 text"),
        "list.yaml": (b"- capdec\n", "expected a mapping"),
    }
    for name, (content, fragment) in cases.items():
        (tmp_path / name).write_bytes(content)
        fails_with(capsys, ["train", "capdec", "--config", str(tmp_path / name)], name, fragment)
        fails_with(capsys, ["run", str(tmp_path / name)], name, fragment)
    fails_with(capsys, ["run", str(tmp_path)], "is a folder")
    (tmp_path / "unknown.yaml").write_text("recipe: capdecc\n")  # before what else is missing
    fails_with(capsys, ["run", str(tmp_path / "unknown.yaml")], "unknown recipe 'capdecc'")


def test_serve_refuses_a_port_it_cannot_have_before_loading_anything(tmp_path, capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fails_with(capsys, ["serve", str(tmp_path / "nope"), "--port", str(port)],
                   f"127.0.0.1:{port}", "in use")  # fmt: skip
    with pytest.raises(SystemExit) as exit_:
        main(["serve", str(tmp_path / "nope"), "--port", "70000"])
    assert exit_.value.code == 2 and "at most 65535" in capsys.readouterr().err


def test_json_outputs_are_strict(tmp_path):
    from pairfree.io import atomic_write_json

    atomic_write_json(tmp_path / "r.json", {"rel": math.nan, "ok": 1.5, "rows": [math.inf]})

    def reject(constant):
        raise ValueError(constant)

    assert json.loads((tmp_path / "r.json").read_text(), parse_constant=reject) == {
        "rel": None,
        "ok": 1.5,
        "rows": [None],
    }


# --------------------------------------------------------------------------- one clear line
def test_a_damaged_checkpoint_is_named(world, checkpoint, tmp_path, capsys):
    damaged = tmp_path / "ckpt"
    shutil.copytree(checkpoint, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    out = tmp_path / "c.json"
    fails_with(capsys, ["caption", str(damaged), str(world.images), "--out", str(out)],
               "model.safetensors", "damaged")  # fmt: skip
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_image_over_the_pixel_limit_is_skipped(world, checkpoint, tmp_path, capsys, monkeypatch):
    images = tmp_path / "in"
    copy_images(world, images, ["ok.png"])
    Image.new("RGB", (200, 200)).save(images / "huge.png")
    monkeypatch.setenv("PAIRFREE_MAX_IMAGE_PIXELS", str(100 * 100))
    out = tmp_path / "c.json"
    assert main(["caption", str(checkpoint), str(images), "--out", str(out), "--quiet"]) == 0
    assert [r["image_id"] for r in json.loads(out.read_text())] == ["ok"]
    printed = capsys.readouterr().out
    assert "huge.png" in printed and "PAIRFREE_MAX_IMAGE_PIXELS" in printed
    monkeypatch.delenv("PAIRFREE_MAX_IMAGE_PIXELS")  # PIL's own limit is back afterwards
    from pairfree.data import load_image

    assert load_image(images / "huge.png").size == (200, 200)


def test_outputs_in_the_wrong_place_are_refused_before_any_work(
    world, checkpoint, tiny_clip_dir, tmp_path, capsys
):
    folder = tmp_path / "a-folder"
    folder.mkdir()
    fails_with(capsys, ["caption", str(checkpoint), str(world.images), "--out", str(folder)],
               "is a folder")  # fmt: skip
    a_file = tmp_path / "store"
    a_file.write_text("keep me")
    fails_with(capsys, ["encode", "--captions", str(world.corpus), "--clip", f"hf:{tiny_clip_dir}",
                        "--out", str(a_file)], "is a file")  # fmt: skip
    assert a_file.read_text() == "keep me" and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.batch_size=0", "batch_size must be at least 1"),
        ("train.batch_size=2.5", "train.batch_size: 2.5 is not a whole number"),
        ("train.lr=-1", "lr must be > 0"),
        ("train.lr=abc", "train.lr: 'abc' is not a valid float"),
        ("generation.num_beams=0", "num_beams must be at least 1"),
        ("train.schedule=exponential", "schedule must be one of"),
    ],
)
def test_bad_config_values_are_refused_at_load_time(world, tmp_path, capsys, override, fragment):
    fails_with(capsys, ["train", "capdec", f"corpus.path={world.corpus}", override], fragment)


@pytest.mark.parametrize("flag", ["--beams", "--batch-size", "--max-tokens"])
def test_zero_counts_on_the_command_line_are_refused(checkpoint, world, capsys, flag):
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(checkpoint), str(world.images), flag, "0"])
    assert exit_.value.code == 2 and "must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        [
            "offset",
            "--dataset",
            "d.json",
            "--clip",
            "world:builtin",
            "--out",
            "o",
            "--max-images",
            "0",
        ],
        ["import-checkpoint", "x.pt", "--out", "o", "--mapper", "mlp", "--prefix-length", "0"],
        ["world", "train-clip", "o", "--steps", "0"],
        ["world", "train-clip", "o", "--batch-size", "1"],  # contrastive: needs two
    ],
)
def test_counts_out_of_range_are_argument_errors_on_every_command(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and "must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("size", ["0", "11", "100000"])
def test_a_world_image_size_out_of_range_is_refused(tmp_path, capsys, size):
    with pytest.raises(SystemExit) as exit_:
        main(["world", "make", str(tmp_path / "w"), "--image-size", size])
    assert exit_.value.code == 2 and "--image-size" in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_an_empty_corpus_is_one_line_and_leaves_no_store(
    tiny_clip_dir, tiny_gpt2_dir, tmp_path, capsys
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n   \n")
    features = tmp_path / "features"
    fails_with(capsys, ["train", "capdec", f"corpus.path={corpus}", f"clip=hf:{tiny_clip_dir}",
                        f"model.lm={tiny_gpt2_dir}", f"features={features}",
                        f"train.output_dir={tmp_path / 'run'}"],
               "no usable sentences")  # fmt: skip
    assert not features.exists()


def test_missing_data_and_models_are_one_line(world, tiny_clip_dir, tmp_path, capsys):
    fails_with(capsys, ["train", "capdec", f"corpus.path={tmp_path / 'nope.txt'}"],
               "corpus.path", "does not exist")  # fmt: skip
    fails_with(capsys, ["train", "capdec", f"corpus.path={world.corpus}",
                        f"clip=hf:{tiny_clip_dir}", f"model.lm={tmp_path / 'no-lm'}",
                        f"train.output_dir={tmp_path / 'run'}"],
               "cannot load the LM", "no-lm does not exist")  # fmt: skip
    fails_with(capsys, ["encode", "--captions", str(world.corpus), "--clip", "hf:./no-clip",
                        "--out", str(tmp_path / "store")], "./no-clip does not exist")  # fmt: skip
    fails_with(capsys, ["encode", "--captions", str(world.corpus), "--clip", "world:biultin",
                        "--out", str(tmp_path / "store")], "neither a shipped one (builtin, v2)")  # fmt: skip
    config = tmp_path / "exp.yaml"
    config.write_text(
        f"recipe: capdec\ncorpus: {{path: {world.corpus}}}\n"
        f"evaluation: {{dataset: {tmp_path / 'missing.json'}}}\n"
        f"train: {{output_dir: {tmp_path / 'run2'}}}\n"
    )
    fails_with(capsys, ["run", str(config)], "evaluation.dataset", "does not exist")


def test_a_closed_pipe_ends_quietly():
    proc = subprocess.Popen(
        [sys.executable, "-m", "pairfree.cli", "train", "capdec", "--print-config"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    proc.stdout.close()  # `| head` that already left
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err and b"Exception" not in err


def test_evaluate_prints_its_scores_before_a_failing_write(
    world, checkpoint, tmp_path, capsys, monkeypatch
):
    from pairfree.evaluate import EvaluationReport

    preds = tmp_path / "preds.json"
    assert main(["caption", str(checkpoint), "--dataset", str(world.dataset), "--out",
                 str(preds), "--quiet"]) == 0  # fmt: skip

    def disk_full(self, prefix):
        raise OSError(28, "No space left on device", str(prefix) + ".json")

    monkeypatch.setattr(EvaluationReport, "write", disk_full)
    capsys.readouterr()
    assert main(["evaluate", str(preds), str(world.dataset)]) == 1
    captured = capsys.readouterr()
    assert "| overall |" in captured.out and "No space left" in captured.err
    assert "Traceback" not in captured.err


# --------------------------------------------------------------------------- caches
def test_a_store_of_other_clip_weights_is_refused(world, tiny_clip_dir, tmp_path, capsys):
    import torch
    from transformers import CLIPModel

    clip_dir = tmp_path / "clip"
    shutil.copytree(tiny_clip_dir, clip_dir)
    store = tmp_path / "store"
    args = [
        "encode",
        "--captions",
        str(world.corpus),
        "--clip",
        f"hf:{clip_dir}",
        "--out",
        str(store),
    ]
    assert main(args) == 0
    model = CLIPModel.from_pretrained(clip_dir)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(clip_dir)  # re-trained and saved at the same path
    capsys.readouterr()
    fails_with(capsys, args, "already holds a different store", "other weights")


def test_every_command_checks_where_it_writes(world, tmp_path, capsys):
    a_file = tmp_path / "taken"
    a_file.write_text("keep me")
    fails_with(capsys, ["world", "make", str(a_file)], "is a file")
    fails_with(capsys, ["demo", "--out", str(a_file)], "is a file")
    fails_with(capsys, ["offset", "--dataset", str(world.dataset), "--clip", "hf:x", "--out",
                        str(tmp_path)], "is a folder")  # fmt: skip
    fails_with(capsys, ["import-checkpoint", str(tmp_path / "missing.pt"), "--out",
                        str(tmp_path / "imported"), "--mapper", "mlp", "--prefix-length", "10"],
               "missing.pt")  # fmt: skip
    assert a_file.read_text() == "keep me" and not (tmp_path / "imported").exists()
    if Path("/proc/self").exists():  # a place nobody can write, root included
        fails_with(capsys, ["world", "make", "/proc/pairfree-world"], "not writable")


def test_report_refuses_a_folder_that_is_not_a_run_and_names_a_bad_metrics_line(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "r.html")]) == 2
    assert "not a training run" in capsys.readouterr().err
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"train": {"seed": 0}, "recipe": "capdec"}')
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo\n'
                                       '{"step": 3, "loss": 1.0}\n')  # fmt: skip
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 2
    assert "metrics.jsonl:2" in capsys.readouterr().err and not (tmp_path / "r.html").exists()
    # a last line cut by an interruption is only left out
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    assert "<svg" in (tmp_path / "r.html").read_text()
