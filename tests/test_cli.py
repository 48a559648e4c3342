"""The command line end to end on a tiny world with tiny models: encode, train, caption
(with bad images and resume), evaluate, a whole experiment, and clear errors."""

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pairfree.cli import main
from pairfree.features import FeatureStore
from pairfree.world import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(
        tmp_path_factory.mktemp("world"), n_train_images=2, n_val=2, n_test=4, n_corpus=24, seed=0
    )


def train_args(world, clip_dir, gpt2_dir, out):
    return [
        f"corpus.path={world.corpus}", f"clip=hf:{clip_dir}", f"model.lm={gpt2_dir}",
        "model.prefix_length=2", "model.clip_length=2", "model.mapper_layers=1",
        f"train.output_dir={out}", "train.batch_size=8", "train.max_steps=3",
        "train.warmup_steps=1", "corpus.val_fraction=0.2",
    ]  # fmt: skip


def test_encode_train_caption_evaluate(world, tiny_clip_dir, tiny_gpt2_dir, tmp_path, capsys):
    store = tmp_path / "text"
    assert (
        main(
            [
                "encode",
                "--captions",
                str(world.corpus),
                "--clip",
                f"hf:{tiny_clip_dir}",
                "--out",
                str(store),
            ]
        )
        == 0
    )
    assert "wrote 24 text features of dim 16" in capsys.readouterr().out
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["count"] == 24 and manifest["complete"]

    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "capdec",
                "--no-progress",
                *train_args(world, tiny_clip_dir, tiny_gpt2_dir, run),
            ]
        )
        == 0
    )
    assert (run / "last" / "model.safetensors").exists() and (run / "best").exists()

    images = sorted(world.images.glob("test_*.png"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "empty.png").write_bytes(b"")
    out = tmp_path / "captions.json"
    args = ["caption", str(run / "last"), *map(str, images), str(tmp_path / "broken.png"), str(tmp_path / "empty.png"),
            "--out", str(out), "--beams", "2", "--max-tokens", "6", "--project-to", str(store)]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "skipped 2 bad items" in printed and "broken.png" in printed
    skipped = [
        json.loads(x) for x in (tmp_path / "captions.json.skipped.jsonl").read_text().splitlines()
    ]
    assert {r["source"].rsplit("/", 1)[-1] for r in skipped} == {"broken.png", "empty.png"}
    preds = json.loads(out.read_text())
    assert [p["image_id"] for p in preds] == [p.stem for p in images]
    # --project-to fed the decoder DeCap projections onto the encoded corpus: the captions are
    # the ones the projected conditions give, not the raw image embeddings'
    from pairfree.pipeline import Captioner
    from pairfree.projection import project_to_memory

    projected = Captioner.from_pretrained(
        run / "last", project_to=store, num_beams=2, max_new_tokens=6
    )
    embeds = projected.clip.encode_images([Image.open(p).convert("RGB") for p in images])
    memory = FeatureStore(store).tensor()
    expected = project_to_memory(F.normalize(embeds, dim=-1), memory, 0.01)
    torch.testing.assert_close(projected.conditions(embeds), expected)
    assert [p["caption"] for p in preds] == projected.caption_embeddings(embeds)
    raw = Captioner.from_pretrained(run / "last", num_beams=2, max_new_tokens=6)
    assert not torch.allclose(raw.conditions(embeds), expected, atol=1e-3)
    assert main(args + ["--strict", "--batch-size", "1"]) == 2  # the first bad image is fatal
    assert "broken.png" in capsys.readouterr().err

    # an interrupted run resumes: captions already in the partial file are kept, not redone
    # (the strict run left one: its settings line, then the captions before the bad image)
    partial = out.with_name(out.name + ".partial.jsonl")
    settings = partial.read_text().splitlines()[0]
    kept = json.dumps({"image_id": images[0].stem, "caption": "kept from before"})
    partial.write_text(f"{settings}\n{kept}\n{{cut")
    assert main(args[:2] + [str(images[0]), str(images[1])] + args[-8:]) == 0
    assert "resuming: 1 images" in capsys.readouterr().out
    assert json.loads(out.read_text())[0]["caption"] == "kept from before" and not partial.exists()

    report = tmp_path / "metrics"
    refs = world.dataset
    assert main(["evaluate", str(out), str(refs), "--out", str(report)]) == 0
    scores = json.loads((tmp_path / "metrics.json").read_text())["scores"]
    overall = next(iter(scores.values()))
    assert set(overall) >= {"Bleu_4", "METEOR", "ROUGE_L", "CIDEr"} and overall["SPICE"] is None
    assert "| B@1" in (tmp_path / "metrics.md").read_text()


def test_run_experiment_writes_predictions_and_metrics(
    world, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"recipe: capdec\nevaluation:\n  dataset: {world.dataset}\n  split: test\n"
                   "generation:\n  num_beams: 1\n  max_new_tokens: 5\n")  # fmt: skip
    out = tmp_path / "run"
    assert (
        main(
            [
                "run",
                str(cfg),
                "--no-progress",
                *train_args(world, tiny_clip_dir, tiny_gpt2_dir, out),
            ]
        )
        == 0
    )
    preds = json.loads((out / "captions_test.json").read_text())
    assert len(preds) == 4
    assert "CIDEr" in json.loads((out / "metrics_test.json").read_text())["scores"]["overall"]


def test_errors_are_clear(world, tmp_path, capsys):
    assert main(["train", "capdec", "trian.lr=1"]) == 2
    assert "unknown config key trian" in capsys.readouterr().err
    assert main(["train", "capdec", "train.lr=fast"]) == 2
    assert "not a valid float" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "a red circle"}\n{"caption": \n')
    assert (
        main(
            [
                "encode",
                "--captions",
                str(bad),
                "--clip",
                "hf:x",
                "--out",
                str(tmp_path / "s"),
                "--strict",
            ]
        )
        == 2
    )
    assert f"{bad}:2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["caption", "--help"])
    assert "COCO results JSON" in capsys.readouterr().out


def test_offset_then_capdec_subtracts_it_at_inference(
    world, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    import torch
    from safetensors.torch import load_file

    from pairfree.captioner import load_captioner

    offset = tmp_path / "offset.safetensors"
    assert (
        main(
            [
                "offset",
                "--dataset",
                str(world.dataset),
                "--split",
                "test",
                "--clip",
                f"hf:{tiny_clip_dir}",
                "--out",
                str(offset),
            ]
        )
        == 0
    )
    gap = load_file(str(offset))["offset"]
    # the mean normalized image embedding minus the mean normalized caption embedding
    from pairfree.clip import load_clip
    from pairfree.data import load_image, read_images

    clip = load_clip(f"hf:{tiny_clip_dir}")
    items = read_images(world.dataset, split="test")
    image = clip.encode_images([load_image(it.path) for it in items], normalize=True).mean(0)
    text = clip.encode_texts([r for it in items for r in it.references], normalize=True).mean(0)
    torch.testing.assert_close(gap, image - text, rtol=1e-5, atol=1e-6)
    run = tmp_path / "run"
    args = train_args(world, tiny_clip_dir, tiny_gpt2_dir, run)
    assert (
        main(
            [
                "train",
                "capdec",
                "--no-progress",
                *args,
                f"offset.path={offset}",
                "offset.mode=inference",
            ]
        )
        == 0
    )
    _, _, card = load_captioner(run / "last")
    assert card.conditioning.offset_mode == "inference"
    assert card.conditioning.offset == pytest.approx(gap.tolist())


def test_import_checkpoint_gives_the_original_logits(tiny_gpt2_dir, tmp_path):
    import torch
    from transformers import GPT2LMHeadModel

    from pairfree.captioner import CaptionerConfig, PrefixCaptioner, load_captioner

    torch.manual_seed(0)
    config = CaptionerConfig(lm=str(tiny_gpt2_dir), embed_dim=16, prefix_length=3, mapper="mlp")
    model = PrefixCaptioner(config, GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir)).eval()
    # the original ClipCap layout: clip_project.* (the mapper) and gpt.* (GPT2LMHeadModel)
    original = {
        k.replace("mapper.", "clip_project.", 1).replace("lm.", "gpt.", 1): v
        for k, v in model.state_dict().items()
    }
    torch.save(original, tmp_path / "coco_prefix-009.pt")
    out = tmp_path / "imported"
    assert main(["import-checkpoint", str(tmp_path / "coco_prefix-009.pt"), "--out", str(out), "--mapper", "mlp",
                 "--prefix-length", "3", "--tokenizer", str(tiny_gpt2_dir), "--lm-config", str(tiny_gpt2_dir), "--clip", "hf:none"]) == 0  # fmt: skip
    imported, _, card = load_captioner(out)
    cond, ids, mask = (
        torch.randn(2, 16),
        torch.tensor([[64, 3290, 13], [64, 3797, 13]]),
        torch.ones(2, 3),
    )
    torch.testing.assert_close(imported(cond, ids, mask).logits, model(cond, ids, mask).logits)
    assert card.clip == "hf:none" and card.recipe == "imported"
    # decoded as the original generate_beam: its search, beam 5, no end-of-text stop
    generation = card.generation
    assert (generation.search, generation.num_beams, generation.stop_at_eos) == (
        "clipcap",
        5,
        False,
    )


def test_encode_stores_grid_features_as_float16_unless_asked(world, tmp_path):
    images = sorted(world.images.glob("test_*.png"))[:2]
    folder = tmp_path / "images"
    folder.mkdir()
    for path in images:
        shutil.copy(path, folder / path.name)
    base = ["encode", "--images", str(folder), "--clip", "world:builtin"]
    assert main([*base, "--grid", "--out", str(tmp_path / "grid")]) == 0
    assert main([*base, "--grid", "--dtype", "float32", "--out", str(tmp_path / "grid32")]) == 0
    assert main([*base, "--out", str(tmp_path / "embeddings")]) == 0
    dtypes = {
        name: {s.dtype.name for s in FeatureStore(tmp_path / name).iter_shards()}
        for name in ("grid", "grid32", "embeddings")
    }
    assert dtypes == {"grid": {"float16"}, "grid32": {"float32"}, "embeddings": {"float32"}}
    torch.testing.assert_close(
        FeatureStore(tmp_path / "grid").tensor(),
        FeatureStore(tmp_path / "grid32").tensor(),
        rtol=2e-3,
        atol=2e-3,
    )


def test_encode_in_two_processes_covers_every_item_once(world, tiny_clip_dir, tmp_path):
    import os
    import subprocess
    import sys

    import torch

    from pairfree.features import FeatureStore

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pairfree.cli",
           "encode", "--captions", str(world.corpus), "--clip", f"hf:{tiny_clip_dir}", "--out", str(tmp_path / "two"),
           "--shard-size", "5"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("wrote 24 text features") == 1  # one store, by two ranks
    assert (
        main(
            [
                "encode",
                "--captions",
                str(world.corpus),
                "--clip",
                f"hf:{tiny_clip_dir}",
                "--out",
                str(tmp_path / "one"),
                "--shard-size",
                "5",
            ]
        )
        == 0
    )
    two, one = FeatureStore(tmp_path / "two"), FeatureStore(tmp_path / "one")
    assert two.ids == one.ids and len(set(two.ids)) == 24
    torch.testing.assert_close(two.tensor(), one.tensor())


def test_caption_in_two_processes_shards_the_images_and_merges_them(
    world, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    """Under torchrun each process captions its slice (resumably, in its own partial file);
    the first merges them in input order: the same file one process writes."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    assert main(["train", "capdec", *train_args(world, tiny_clip_dir, tiny_gpt2_dir, out),
                 "--no-progress"]) == 0  # fmt: skip
    images = sorted((world.root / "images").glob("*.png"))
    (tmp_path / "in").mkdir()
    for image in images:
        shutil.copy(image, tmp_path / "in" / image.name)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    one = tmp_path / "one.json"
    assert main(["caption", str(out / "last"), str(tmp_path / "in"), "--out", str(one), "-q"]) == 0
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    two = tmp_path / "two.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
           "pairfree.cli", "caption", str(out / "last"), str(tmp_path / "in"), "--out", str(two),
           "--batch-size", "2", "-q"]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(two.read_text()) == json.loads(one.read_text())
    assert done.stdout.count(f"captioned {len(images)} images") == 1
    assert "broken.png" in (tmp_path / "two.json.skipped.jsonl").read_text()
    assert not list(tmp_path.glob("two.json.partial*"))
