"""SaCap: re-pairing, the recipe end to end on a tiny world through the CLI (synthesize,
train, caption), its ablations, and resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pairfree.cli import main
from pairfree.recipes.sacap import repair


def test_repairing_picks_the_most_similar_candidate_and_breaks_ties_at_random():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    images = torch.tensor([[0.0, 1.0], [1.0, 0.1], [2.0, 0.0], [0.0, 3.0], [0.0, 1.0]])
    # caption 0: rows 0, 1, 2 -> row 2 (cosine 1); caption 1: rows 3, 4 tie at cosine 1
    picks = [repair(text, images, [[0, 1, 2], [3, 4]], torch.Generator().manual_seed(s))
             for s in range(40)]  # fmt: skip
    assert all(p[0] == 2 for p in picks)
    assert {p[1] for p in picks} == {3, 4}  # both tied rows get picked
    again = [repair(text, images, [[0, 1, 2], [3, 4]], torch.Generator().manual_seed(s))
             for s in range(40)]  # fmt: skip
    assert again == picks  # seeded
    assert repair(text, images, [[1], [0]], torch.Generator()) == [1, 0]  # one candidate


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """A tiny world, its captions' synthetic images, rephrasings and supporting images."""
    from pairfree.world import make_world
    from pairfree.world.lm import build_world_lm

    root = tmp_path_factory.mktemp("sacap")
    world = make_world(root / "world", n_train_images=0, n_val=0, n_test=6, n_corpus=48, seed=3)
    quiet = ["--no-progress"]
    assert main(["synthesize", "images", str(world.corpus), "--backend", "world:default",
                 "--out", str(root / "own"), *quiet]) == 0  # fmt: skip
    assert main(["synthesize", "rephrase", str(world.corpus), "--llm", "world:default",
                 "--out", str(root / "rephrased"), *quiet]) == 0  # fmt: skip
    assert main(["synthesize", "images", str(root / "rephrased" / "prompts.jsonl"), "--backend",
                 "world:default", "--out", str(root / "supporting"), *quiet]) == 0  # fmt: skip
    lm = build_world_lm(root / "lm", n_layer=1, n_embd=32, n_head=2)
    return root, world, lm


def sacap_args(root, world, lm, out, *extra) -> list[str]:
    return ["train", "sacap", f"corpus.path={world.corpus}", "clip=world:builtin",
            f"synthetic.images={root / 'own'}", f"synthetic.rephrasings={root / 'rephrased'}",
            f"synthetic.supporting={root / 'supporting'}", f"phrases.vocabulary={world.phrases}",
            f"model.lm={lm}", "model.prefix_length=2", "model.soft_prompt_hidden=32",
            "train.max_steps=12", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=2",
            "train.checkpoint_every=4", "train.log_every=2", "corpus.val_fraction=0.1", "generation.num_beams=2",
            f"train.output_dir={out}", f"features={root / 'features'}", "--no-progress",
            *extra]  # fmt: skip


def test_sacap_trains_from_synthetic_data_and_captions_images(synthesized, tmp_path, capsys):
    root, world, lm = synthesized
    out = tmp_path / "run"
    assert main(sacap_args(root, world, lm, out)) == 0
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]  # it learns
    card = json.loads((out / "last" / "config.json").read_text())
    assert card["family"] == "cross_attention" and card["card"]["recipe"] == "sacap"
    assert card["card"]["conditioning"]["project_in_training"] is True
    assert card["card"]["conditioning"]["prompt_phrases"]  # the hard-prompt vocabulary
    images = sorted((world.root / "images").glob("test_*.png"))
    captions = tmp_path / "captions.json"
    assert main(["caption", str(out / "last"), *map(str, images), "--out", str(captions),
                 "--quiet"]) == 0  # fmt: skip
    results = json.loads(captions.read_text())
    assert len(results) == len(images) and all(isinstance(r["caption"], str) for r in results)


@pytest.mark.parametrize("off", ["repair", "hard_prompt", "soft_prompt"])
def test_each_mechanism_switches_off(synthesized, tmp_path, off):
    root, world, lm = synthesized
    out = tmp_path / off
    assert main(sacap_args(root, world, lm, out, f"{off}=false", "train.max_steps=2")) == 0
    card = json.loads((out / "last" / "config.json").read_text())
    conditioning, model = card["card"]["conditioning"], card["captioner"]
    if off == "hard_prompt":
        assert conditioning["prompt_phrases"] is None
    if off == "soft_prompt":
        assert model["prefix_length"] == 0 and conditioning["project_to"] is None
    if off == "repair":
        assert conditioning["prompt_phrases"] and model["prefix_length"] == 2


def test_killed_sacap_run_resumes_to_the_same_weights(synthesized, tmp_path):
    import os
    import subprocess
    import sys

    from resume_helpers import assert_same_weights, kill_after_checkpoint_then_resume

    root, world, lm = synthesized

    def run_cli(args):
        return subprocess.Popen([sys.executable, "-m", "pairfree.cli", *args],
                                env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    extra = ("train.max_steps=8", "train.checkpoint_every=2")
    ref = run_cli(sacap_args(root, world, lm, tmp_path / "ref", *extra))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    args = sacap_args(root, world, lm, tmp_path / "killed", *extra)
    kill_after_checkpoint_then_resume(run_cli, args, tmp_path / "killed", 2)
    assert_same_weights(tmp_path / "ref" / "last", tmp_path / "killed" / "last")


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in (Path(__file__).parents[1] / "configs" / "sacap").glob("*.yaml")),
)
def test_paper_configs_resolve_to_the_papers_settings(path):
    from pairfree.config import read_yaml
    from pairfree.recipes import get_recipe

    data = read_yaml(path)
    assert data.pop("recipe") == "sacap" and data.pop("evaluation")["dataset"]
    cfg = get_recipe("sacap").build_config(data)
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (1e-5, 128, 10)
    assert cfg.train.warmup_steps == 1000 and cfg.tau == 0.01 and cfg.phrases.topk == 3
    assert cfg.model.prefix_length == 10 and cfg.model.max_prompt_tokens == 20
    assert (cfg.generation.num_beams, cfg.generation.max_new_tokens) == (5, 30)
    assert cfg.generation.score_length == "with_prompt"  # its transformers counted the prompt
    assert cfg.generation.stop == "." and not cfg.generation.stop_at_eos  # "." ends a caption
    assert get_recipe("sacap").config_class().generation == cfg.generation  # and so do the defaults
    assert cfg.repair and cfg.hard_prompt and cfg.soft_prompt
    assert cfg.clip == "hf:openai/clip-vit-base-patch32"


def test_bad_inputs_fail_early_or_are_skipped_and_reported(synthesized, tmp_path, capsys):
    import shutil

    root, world, lm = synthesized
    out = tmp_path / "run"
    assert main(sacap_args(root, world, lm, out, f"synthetic.images={tmp_path / 'nope'}")) == 2
    assert "synthetic.images" in capsys.readouterr().err
    empty = tmp_path / "phrases.txt"
    empty.write_text("\n\n")
    assert main(sacap_args(root, world, lm, out, f"phrases.vocabulary={empty}")) == 2
    assert f"{empty}: holds no phrase" in capsys.readouterr().err
    # a malformed rephrasing line and an unreadable supporting image: skipped, named, the rest
    # trains
    rephrased, supporting = tmp_path / "rephrased", tmp_path / "supporting"
    shutil.copytree(root / "rephrased", rephrased)
    shutil.copytree(root / "supporting", supporting)
    with open(rephrased / "rephrasings.jsonl", "a") as f:
        f.write('{"caption": "a red circle", "rephrasings": \n')
    broken = sorted((supporting / "images").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    args = sacap_args(root, world, lm, out, f"synthetic.rephrasings={rephrased}",
                      f"synthetic.supporting={supporting}", f"features={tmp_path / 'features'}",
                      "train.max_steps=2")  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "rephrasings.jsonl" in err and broken.name in err
    assert (out / "last" / "model.safetensors").is_file()
