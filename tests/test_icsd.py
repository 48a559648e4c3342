"""ICSD: grouping -> select-summarize -> one image per summary -> pairs, the captioner with its
own image tower, the recipe end to end on a tiny world through the CLI, and resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from pairfree.cli import main
from pairfree.recipes.icsd import pre_caption


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny world corpus and a tiny world BERT decoder."""
    from pairfree.world import make_world
    from pairfree.world.lm import build_world_bert

    root = tmp_path_factory.mktemp("icsd")
    world = make_world(root / "world", n_train_images=0, n_val=0, n_test=6, n_corpus=48, seed=3)
    bert = build_world_bert(root / "bert", n_layer=1, hidden=32, n_head=2)
    return root, world, bert


def icsd_args(world, bert, out, *extra) -> list[str]:
    return ["train", "icsd", f"corpus.path={world.corpus}", "clip=world:builtin",
            "synthesis.llm.spec=world:default", "synthesis.images.backend=world:default",
            "synthesis.group_size=5", f"model.lm={bert}", "train.max_steps=12",
            "train.batch_size=8", "train.lr=3e-3", "train.eval_every=6",
            "train.checkpoint_every=4", "train.log_every=2", "corpus.val_fraction=0.2",
            "generation.num_beams=2", f"train.output_dir={out}", "--no-progress",
            *extra]  # fmt: skip


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    root, world, bert = tiny
    out = tmp_path_factory.mktemp("icsd-run")
    assert main(icsd_args(world, bert, out, f"synthesis.out={root / 'synthetic'}")) == 0
    return out, root / "synthetic"


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_selected_caption_is_paired_with_its_groups_image_and_only_with_it(trained):
    out, synthetic = trained
    summaries = read_jsonl(synthetic / "summaries" / "summaries.jsonl")
    manifest = read_jsonl(synthetic / "images" / "manifest.jsonl")
    image_of = {r["source"]: str(synthetic / "images" / r["image"]) for r in manifest}
    pairs = read_jsonl(out / "pairs.jsonl")
    by_group: dict[str, list[dict]] = {}
    for pair in pairs:
        by_group.setdefault(pair["group"], []).append(pair)
    assert len(by_group) == len(summaries) > 1
    for summary in summaries:
        paired = by_group[f"multi-{summary['id']}"]
        assert sorted(p["caption"] for p in paired) == sorted(
            pre_caption(c, 30) for c in summary["captions"]
        )
        assert {p["image"] for p in paired} == {image_of[summary["id"]]}
    # no image is shared between groups; the LLM's selection, not the whole group, is paired
    assert len({p["image"] for p in pairs}) == len(summaries)
    groups = read_jsonl(synthetic / "groups" / "groups.jsonl")
    assert len(pairs) < sum(len(g["captions"]) for g in groups)


def test_icsd_learns_saves_its_tower_and_captions_through_the_cli(
    trained, tiny, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    from pairfree.clip import load_clip
    from pairfree.pipeline import Captioner

    out, _ = trained
    _, world, _ = tiny
    history = read_jsonl(out / "metrics.jsonl")
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < losses[0]
    evals = [h["eval"] for h in history if "eval" in h]
    assert evals and all("val_CIDEr+BLEU_4" in e and "val_loss" in e for e in evals)
    meta = json.loads((out / "last" / "config.json").read_text())
    assert meta["captioner"]["image_encoder"] is True and meta["card"]["recipe"] == "icsd"
    assert meta["card"]["generation"]["num_beams"] == 2
    # the fine-tuned tower is in the checkpoint, and differs from the CLIP it started from
    weights = load_file(str(out / "last" / "model.safetensors"))
    start = load_clip("world:builtin").vision_tower().state_dict()
    tower = {k.removeprefix("vision."): v for k, v in weights.items() if k.startswith("vision.")}
    assert tower.keys() == start.keys()
    assert any(not torch.equal(tower[k], start[k]) for k in start if start[k].is_floating_point())

    images = sorted((world.root / "images").glob("test_*.png"))
    captions = tmp_path / "captions.json"
    assert main(["caption", str(out / "last"), *map(str, images), "--out", str(captions),
                 "--quiet"]) == 0  # fmt: skip
    cli = [r["caption"] for r in json.loads(captions.read_text())]
    captioner = Captioner.from_pretrained(out / "last")
    assert not captioner.needs_embeddings  # ICSD reads pixels only: no CLIP image pass

    def no_clip_pass(*args, **kwargs):
        raise AssertionError("an ICSD captioner computed CLIP image embeddings")

    monkeypatch.setattr(captioner.clip, "encode_images", no_clip_pass)
    api = captioner.caption(images)
    assert cli == api and len(api) == len(images)


def test_a_frozen_image_encoder_keeps_the_clips_weights_and_statistics(tiny, trained, tmp_path):
    from safetensors.torch import load_file

    from pairfree.clip import load_clip

    _, world, bert = tiny
    _, synthetic = trained
    out = tmp_path / "frozen"
    args = ("freeze_image_encoder=true", "train.max_steps=2", f"synthesis.out={synthetic}")
    assert main(icsd_args(world, bert, out, *args)) == 0
    weights = load_file(str(out / "last" / "model.safetensors"))
    start = load_clip("world:builtin").vision_tower().state_dict()
    for key, value in start.items():  # batch-norm running statistics included
        assert torch.equal(weights["vision." + key], value), key


def test_nsfw_flagged_images_never_reach_a_batch(tiny, tmp_path, monkeypatch):
    """The safety checker's flags (here: every summary naming a circle) keep an image out of
    the pairs, the training batches and validation."""
    from dataclasses import replace

    import pairfree.recipes.icsd as icsd
    import pairfree.training.cross_attention as training
    from pairfree.config import build_config
    from pairfree.synth.text_to_image import load_text_to_image

    root, world, bert = tiny

    class Flagging:
        def __init__(self, spec, settings, device):
            self.inner = load_text_to_image(spec, settings, device=device)
            self.name = self.inner.name

        def generate(self, prompts, seeds):
            made = self.inner.generate(prompts, seeds)
            return [replace(image, nsfw="circle" in prompt)
                    for prompt, image in zip(prompts, made, strict=True)]  # fmt: skip

    read = []

    def spy(path):
        read.append(str(path))
        return Image.open(path).convert("RGB")

    monkeypatch.setattr(icsd, "load_text_to_image", lambda s, st, device: Flagging(s, st, device))
    monkeypatch.setattr(training, "load_image", spy)
    args = [a for a in icsd_args(world, bert, tmp_path / "run", "train.max_steps=4") if "=" in a]
    cfg = build_config(icsd.ICSDConfig, overrides=args)
    icsd.train_icsd(cfg, progress=False)
    manifest = read_jsonl(tmp_path / "run" / "synthetic" / "images" / "manifest.jsonl")
    flagged = {str(tmp_path / "run" / "synthetic" / "images" / r["image"])
               for r in manifest if r["nsfw"]}  # fmt: skip
    assert flagged and len(flagged) < len(manifest)
    assert read and not flagged & set(read)
    pairs = read_jsonl(tmp_path / "run" / "pairs.jsonl")
    assert not flagged & {p["image"] for p in pairs}


def test_prompt_tokens_are_masked_from_the_loss(tiny):
    """The loss is the cross-entropy of the caption tokens (and [SEP]) only: the prompt
    "[CLS] a picture of" is read, never predicted."""
    from transformers import AutoTokenizer

    from pairfree.captioner.cross_attention import (
        CrossAttentionCaptioner,
        CrossAttentionConfig,
        load_cross_attention_lm,
    )
    from pairfree.clip import load_clip

    _, _, bert = tiny
    tokenizer = AutoTokenizer.from_pretrained(bert)
    torch.manual_seed(0)
    vision = load_clip("world:builtin").vision_tower().eval()
    config = CrossAttentionConfig(lm=str(bert), embed_dim=64, grid_width=vision.grid_shape[1],
                                  prefix_length=0, separator="[CLS] a picture of",
                                  image_encoder=True)  # fmt: skip
    separator = tokenizer(config.separator, add_special_tokens=False)["input_ids"]
    model = CrossAttentionCaptioner(config, load_cross_attention_lm(str(bert)),
                                    separator_ids=separator, vision=vision).eval()  # fmt: skip
    caption = tokenizer(" a red circle", add_special_tokens=False)["input_ids"] + [
        tokenizer.sep_token_id
    ]
    ids = torch.tensor([caption])
    pixels = torch.randn(1, 3, 64, 64)
    empty = torch.zeros(1, 0, dtype=torch.long)
    with torch.no_grad():
        loss = model(None, pixels, empty, empty, ids, torch.ones_like(ids)).loss
        full = torch.tensor([separator + caption])
        logits = model.lm(input_ids=full, **model.context(pixels)).logits[0]
    log_probs = logits[:-1].log_softmax(-1).gather(-1, full[0, 1:, None]).squeeze(-1)
    n_prompt = len(separator)
    torch.testing.assert_close(loss, -log_probs[n_prompt - 1 :].mean())
    assert not torch.isclose(loss, -log_probs.mean())  # the prompt's tokens would change it


def test_augmentation_keeps_the_encoders_resolution_and_is_seeded(tmp_path):
    from pairfree.clip.vision import PixelSpec
    from pairfree.training.cross_attention import ImageCaptionDataset, ImageExample

    files = []
    for i, size in enumerate([(100, 60), (64, 64), (300, 512)]):
        path = tmp_path / f"{i}.png"
        Image.effect_mandelbrot(size, (-2, -1.2, 1, 1.2), 30 + i).convert("RGB").save(path)
        files.append(path)
    spec = PixelSpec(48)
    data = ImageCaptionDataset([ImageExample(f, [], [1]) for f in files], spec, min_scale=0.5,
                               seed=7)  # fmt: skip
    first = [data[i][1] for i in range(3)]
    assert all(p.shape == (3, 48, 48) for p in first)
    assert all(torch.equal(a, data[i][1]) for i, a in enumerate(first))  # seeded
    data.set_epoch(1)
    assert not all(torch.equal(a, data[i][1]) for i, a in enumerate(first))  # new epoch, new crop
    plain = data.subset([0, 1, 2], train=False)
    assert all(plain[i][1].shape == (3, 48, 48) for i in range(3))
    plain.set_epoch(5)
    assert torch.equal(plain[0][1], data.subset([0], train=False)[0][1])  # no randomness
    state = torch.get_rng_state()
    data[0]
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone


def test_bert_decoder_beam_search_finds_the_brute_force_best():
    from transformers import BertConfig, BertLMHeadModel

    from pairfree.captioner.cross_attention import CrossAttentionCaptioner, CrossAttentionConfig

    vocab, max_len, stop = 6, 4, 2
    torch.manual_seed(0)
    lm = BertLMHeadModel(
        BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=32, max_position_embeddings=32, initializer_range=0.5,
                   is_decoder=True, add_cross_attention=True, pad_token_id=0)
    ).eval()  # fmt: skip
    config = CrossAttentionConfig(lm="bert", embed_dim=4, grid_width=8, prefix_length=0)
    model = CrossAttentionCaptioner(config, lm, separator_ids=[1, 3, 4]).eval()
    grid = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))
    empty = torch.zeros(2, 0, dtype=torch.long)
    out = model.generate(None, grid, empty, empty, num_beams=vocab**max_len,
                         max_new_tokens=max_len, stop_token_ids=[stop], num_return_sequences=2)  # fmt: skip
    seqs = torch.tensor(list(itertools.product(range(vocab), repeat=max_len)))
    none = torch.zeros(len(seqs), 0, dtype=torch.long)
    for i in range(2):
        with torch.no_grad():
            logits = model(None, grid[i].expand(len(seqs), -1, -1), none, none, seqs,
                           torch.ones_like(seqs)).logits  # fmt: skip
        cumulative = logits.log_softmax(-1).gather(-1, seqs[..., None]).squeeze(-1).cumsum(1)
        scored = {}
        for seq, cum in zip(seqs.tolist(), cumulative, strict=True):
            length = seq.index(stop) + 1 if stop in seq else max_len
            scored[tuple(seq[:length])] = float(cum[length - 1]) / length
        best = sorted(scored, key=lambda h: -scored[h])[:2]
        assert out[2 * i : 2 * i + 2] == [list(h) for h in best]


def test_killed_icsd_run_resumes_to_the_same_weights(tiny, trained, tmp_path):
    import os
    import subprocess
    import sys

    from resume_helpers import assert_same_weights, kill_after_checkpoint_then_resume

    _, world, bert = tiny
    _, synthetic = trained

    def run_cli(args):
        return subprocess.Popen([sys.executable, "-m", "pairfree.cli", *args],
                                env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    extra = ("train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=3",
             f"synthesis.out={synthetic}")  # fmt: skip
    ref = run_cli(icsd_args(world, bert, tmp_path / "ref", *extra))
    assert ref.wait(timeout=300) == 0, ref.stdout.read()
    args = icsd_args(world, bert, tmp_path / "killed", *extra)
    kill_after_checkpoint_then_resume(run_cli, args, tmp_path / "killed", 4)
    assert_same_weights(tmp_path / "ref" / "last", tmp_path / "killed" / "last")
    assert_same_weights(tmp_path / "ref" / "best", tmp_path / "killed" / "best")


def test_end_to_end_with_tiny_stable_diffusion_and_single_context_mix(tiny, tiny_sd_dir, tmp_path):
    """The diffusers path (SD classes, DPM-Solver) feeds the recipe, with single-context pairs
    mixed in; the single-context ablation alone trains too."""
    _, world, bert = tiny
    sd = ["synthesis.images.backend=diffusers:" + str(tiny_sd_dir), "synthesis.images.steps=2",
          "synthesis.images.height=32", "synthesis.images.width=32",
          "synthesis.images.dtype=float32", "train.max_steps=2"]  # fmt: skip
    out = tmp_path / "mixed"
    assert main(icsd_args(world, bert, out, *sd, "synthesis.single_context=0.25")) == 0
    manifest = read_jsonl(out / "synthetic" / "images" / "manifest.jsonl")
    assert manifest[0]["backend"] == f"diffusers:{tiny_sd_dir}"
    groups = {p["group"].split("-")[0] for p in read_jsonl(out / "pairs.jsonl")}
    assert groups == {"multi", "single"}
    single = tmp_path / "single"
    args = ["synthesis.multi_context=false", "synthesis.single_context=1.0"]
    assert main(icsd_args(world, bert, single, *sd, *args)) == 0
    pairs = read_jsonl(single / "pairs.jsonl")
    assert {p["group"].split("-")[0] for p in pairs} == {"single"}
    assert len({p["image"] for p in pairs}) == len(pairs)  # one image per caption
    assert not (single / "synthetic" / "summaries").exists()


def test_bad_inputs_fail_early_or_are_skipped_and_reported(tiny, trained, tmp_path, capsys):
    import shutil

    _, world, bert = tiny
    _, synthetic = trained
    out = tmp_path / "run"
    none = ["synthesis.multi_context=false", "synthesis.single_context=0"]
    assert main(icsd_args(world, bert, out, *none)) == 2
    assert "no training pairs" in capsys.readouterr().err
    assert main(icsd_args(world, bert, out, "synthesis.llm.top_p=0")) == 2
    assert "synthesis.llm: top_p must be in (0, 1]" in capsys.readouterr().err
    one = tmp_path / "one.txt"
    one.write_text("a red circle\n")
    assert main(icsd_args(world, bert, out, f"corpus.path={one}")) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(icsd_args(world, bert, out, "validation.dataset=nope.json")) == 2
    assert "validation.dataset" in capsys.readouterr().err
    for bad, named in (
        ("min_scale=0", "min_scale"),
        ("image_encoder_lr=-1", "image_encoder_lr"),
        ("max_words=0", "max_words"),
        ("synthesis.group_size=0", "groups of 0"),
    ):
        assert main(icsd_args(world, bert, out, bad)) == 2, bad
        assert named in capsys.readouterr().err
    # an unreadable synthetic image is skipped and named; the rest trains
    copy = tmp_path / "synthetic"
    shutil.copytree(synthetic, copy)
    broken = sorted((copy / "images" / "images").glob("*.png"))[0]
    broken.write_bytes(b"not a png")
    assert main(icsd_args(world, bert, out, f"synthesis.out={copy}", "train.max_steps=2")) == 0
    assert broken.name in capsys.readouterr().err
    pairs = read_jsonl(out / "pairs.jsonl")
    assert pairs and str(broken) not in {p["image"] for p in pairs}


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in (Path(__file__).parents[1] / "configs" / "icsd").glob("*.yaml")),
)
def test_paper_configs_resolve_to_the_papers_settings(path):
    from pairfree.config import read_yaml
    from pairfree.recipes import get_recipe

    data = read_yaml(path)
    assert data.pop("recipe") == "icsd" and data.pop("evaluation")["dataset"]
    cfg = get_recipe("icsd").build_config(data)
    t = cfg.train
    assert (t.lr, t.weight_decay, t.epochs, t.schedule, t.warmup_steps) == (
        1e-5, 0.05, 30, "cosine", 0)  # fmt: skip
    assert (t.select_metric, t.select_mode, t.eval_every) == ("val_CIDEr+BLEU_4", "max", 500)
    assert (cfg.generation.num_beams, cfg.generation.max_new_tokens) == (3, 26)
    assert cfg.generation.score_length == "with_prompt"  # its transformers counted the prompt
    assert get_recipe("icsd").config_class().generation == cfg.generation  # and so do the defaults
    assert cfg.model.lm == "bert-base-uncased" and cfg.model.separator == "[CLS] a picture of"
    assert cfg.synthesis.group_size == 30 and cfg.min_scale == 0.5
    assert not cfg.freeze_image_encoder and cfg.synthesis.multi_context
    images = cfg.synthesis.images
    assert images.backend == "diffusers:CompVis/stable-diffusion-v1-4" and images.steps == 20
    assert images.scheduler == "DPMSolverMultistepScheduler"
    assert (images.height, images.width) == (512, 512)


def test_world_lm_command_saves_each_untrained_decoder(tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    for kind, model_type in [("bert", "bert"), ("gpt2", "gpt2"), ("roberta", "roberta")]:
        assert main(["world", "lm", str(tmp_path / kind), "--kind", kind]) == 0
        assert AutoConfig.from_pretrained(tmp_path / kind).model_type == model_type
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bert")
    assert tokenizer("[CLS] a picture of", add_special_tokens=False)["input_ids"][0] == (
        tokenizer.cls_token_id
    )


def test_pairfree_run_synthesizes_trains_captions_and_scores_in_one_command(
    tiny, trained, tmp_path
):
    """`pairfree run` on an ICSD config: every stage (the synthetic ones reused here), then the
    best checkpoint captions the test split through its own tower and is scored."""
    _, world, bert = tiny
    _, synthetic = trained
    cfg = tmp_path / "icsd.yaml"
    cfg.write_text(f"recipe: icsd\nevaluation:\n  dataset: {world.dataset}\n  split: test\n")
    out = tmp_path / "run"
    args = icsd_args(world, bert, out, f"synthesis.out={synthetic}", "train.max_steps=6")
    assert main(["run", str(cfg), *args[2:]]) == 0
    preds = json.loads((out / "captions_test.json").read_text())
    assert len(preds) == 6 and all(isinstance(p["caption"], str) for p in preds)
    assert "CIDEr" in json.loads((out / "metrics_test.json").read_text())["scores"]["overall"]
    assert (out / "best" / "model.safetensors").is_file()  # picked by CIDEr + BLEU-4
