"""ICSD: grouping -> select-summarize -> one image per summary -> pairs, the captioner with its
own image tower, the recipe end to end on a tiny world through the CLI, and resume."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from pairfree.cli import main
from pairfree.errors import PairfreeError
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
            "image_size=null", "synthesis.group_clip=null", *extra]  # fmt: skip


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
    assert meta["captioner"]["image_size"] == 64  # image_size=null: the world tower's own
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
    import pairfree.synth.stages as stages
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

    monkeypatch.setattr(stages, "load_text_to_image", lambda s, st, device: Flagging(s, st, device))
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


def test_loss_is_blips_smoothed_cross_entropy_of_the_caption_tokens(tiny):
    """ICSD's loss is BLIP's: cross-entropy with label smoothing 0.1 over the whole
    vocabulary, averaged over the caption tokens and [SEP] of the batch; the prompt
    "[CLS] a picture of" is read, never predicted, and padding is ignored."""
    from transformers import AutoTokenizer

    from pairfree.captioner.cross_attention import (
        CrossAttentionCaptioner,
        CrossAttentionConfig,
        load_cross_attention_lm,
    )
    from pairfree.clip import load_clip
    from pairfree.recipes.icsd import ICSDConfig

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
    captions = [tokenizer(f" {c}", add_special_tokens=False)["input_ids"] + [tokenizer.sep_token_id]
                for c in ("a red circle", "two small blue squares on the left")]  # fmt: skip
    width = max(map(len, captions))
    ids = torch.tensor([c + [tokenizer.pad_token_id] * (width - len(c)) for c in captions])
    mask = torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in captions])
    pixels = torch.randn(2, 3, 64, 64)
    empty = torch.zeros(2, 0, dtype=torch.long)
    smoothing = ICSDConfig().label_smoothing
    assert smoothing == 0.1
    with torch.no_grad():
        loss = model(None, pixels, empty, empty, ids, mask, label_smoothing=smoothing).loss
        plain = model(None, pixels, empty, empty, ids, mask).loss
        # BLIP: the decoder reads prompt + caption; labels are the same ids with the prompt's
        # positions and the padding set to -100; logits at t predict label t + 1
        full = torch.cat((torch.tensor([separator] * 2), ids), 1)
        full_mask = torch.cat((torch.ones(2, len(separator), dtype=torch.long), mask), 1)
        logits = model.lm(input_ids=full, attention_mask=full_mask, **model.context(pixels)).logits
    labels = full.masked_fill(full_mask == 0, -100)
    labels[:, : len(separator)] = -100
    log_p = logits[:, :-1].log_softmax(-1)
    targets = labels[:, 1:]
    kept = targets != -100
    nll = -log_p.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    uniform = -log_p.mean(-1)  # the smoothed share is spread evenly over the vocabulary
    per_token = (1 - smoothing) * nll + smoothing * uniform
    torch.testing.assert_close(loss, per_token[kept].mean())
    torch.testing.assert_close(plain, nll[kept].mean())  # SaCap's, and ICSD's option 0
    assert kept.sum() == mask.sum() and not torch.isclose(loss, plain)


def test_training_images_come_at_the_configured_size_and_are_seeded(tmp_path, tiny_clip_dir):
    """A tower copy at ``image_size`` (here 48 px for a 32-px ViT with 8-px patches, as
    ICSD's 384 for the 224-px ViT-B/32) gets its training and evaluation images at that size."""
    from pairfree.clip import load_clip
    from pairfree.training.cross_attention import ImageCaptionDataset, ImageExample

    files = []
    for i, size in enumerate([(100, 60), (64, 64), (300, 512)]):
        path = tmp_path / f"{i}.png"
        Image.effect_mandelbrot(size, (-2, -1.2, 1, 1.2), 30 + i).convert("RGB").save(path)
        files.append(path)
    tower = load_clip(f"hf:{tiny_clip_dir}").vision_tower(48)
    data = ImageCaptionDataset([ImageExample(f, [], [1]) for f in files], tower.pixels,
                               min_scale=0.5, seed=7)  # fmt: skip
    first = [data[i][1] for i in range(3)]
    assert all(p.shape == (3, 48, 48) for p in first)
    assert tower(torch.stack(first)).shape == (3, 37, 32)  # 6 x 6 patches and the class token
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

    from resume_helpers import resumed_run_equals_uninterrupted

    _, world, bert = tiny
    _, synthetic = trained

    def run_cli(args):
        return subprocess.Popen([sys.executable, "-m", "pairfree.cli", *args],
                                env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    extra = ("train.max_steps=8", "train.checkpoint_every=2", "train.eval_every=3",
             f"synthesis.out={synthetic}")  # fmt: skip
    resumed_run_equals_uninterrupted(run_cli, lambda out: icsd_args(world, bert, out, *extra),
                                     tmp_path, 4, ("last", "best"))  # fmt: skip


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


def test_single_context_pairs_are_syncs_reassignment_with_reassign_set(tiny, tmp_path):
    """``synthesis.reassign`` pairs each kept caption with the single-context image SynC
    assigns it (one group per image), and the run records exactly those pairs."""
    from pairfree.recipes.icsd import pre_caption

    _, world, bert = tiny
    out = tmp_path / "run"
    args = ["synthesis.multi_context=false", "synthesis.single_context=1.0",
            "synthesis.reassign.clip=world:builtin", "train.max_steps=2",
            "synthesis.reassign.sentences=clip:world:builtin", "synthesis.reassign.keep=0.5"]  # fmt: skip
    assert main(icsd_args(world, bert, out, *args)) == 0
    made = out / "synthetic" / "single-reassigned"
    kept = [r for r in read_jsonl(made / "reassignment.jsonl") if r["kept"]]
    pairs = read_jsonl(out / "pairs.jsonl")
    assert 0 < len(pairs) == len(kept) < len(read_jsonl(made / "reassignment.jsonl"))
    assigned = {pre_caption(r["caption"], 30): r["assigned"] for r in kept}  # as pairs read
    assert all(Path(p["image"]).parent == made / "images" for p in pairs)
    assert all(Path(p["image"]).stem == assigned[p["caption"]] for p in pairs)
    assert all(p["group"] == f"single-{Path(p['image']).stem}" for p in pairs)


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
        ("label_smoothing=1", "label_smoothing must be in [0, 1)"),
        ("image_size=384", "image_size=384: world:builtin"),  # a CNN keeps its 64 px
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


def test_settings_are_checked_when_the_config_is_made():
    """A bad setting fails where the config is built (Python or YAML), naming the key, before
    a recipe runs; the defaults pass."""
    from pairfree.config import build_config
    from pairfree.recipes.icsd import ICSDConfig, SynthesisConfig
    from pairfree.synth.llm import LLMConfig

    ICSDConfig()
    for make, message in (
        (lambda: ICSDConfig(min_scale=0), "min_scale is the crop's smallest share"),
        (lambda: ICSDConfig(label_smoothing=1.0), "label_smoothing must be in [0, 1)"),
        (lambda: SynthesisConfig(multi_context=False), "no training pairs"),
        (lambda: SynthesisConfig(single_context=1.5), "single_context is a share"),
        (lambda: LLMConfig(top_p=0), "top_p must be in (0, 1]"),
    ):
        with pytest.raises(PairfreeError, match=re.escape(message)):
            make()
    with pytest.raises(
        PairfreeError, match=re.escape("config synthesis.llm: sampling needs a temperature")
    ):
        build_config(ICSDConfig, {"synthesis": {"llm": {"temperature": 0}}})


def test_icsd_reads_its_synthesis_through_the_shared_settings():
    """One LLM config (the synthesize commands' and ICSD's) and the diffusion settings declared
    once: ICSD's image config is DiffusionSettings with ICSD's defaults, checked the same way."""
    from pairfree.config import build_config
    from pairfree.recipes.icsd import ICSDConfig
    from pairfree.synth.llm import LLMConfig, Sampling
    from pairfree.synth.stages import ImageSynthesisConfig
    from pairfree.synth.text_to_image import DiffusionSettings

    cfg = build_config(ICSDConfig, None, ["synthesis.images.negative_prompt=blurry"])
    assert isinstance(cfg.synthesis.llm, LLMConfig)
    assert cfg.synthesis.llm.sampling() == Sampling(max_new_tokens=500, temperature=1.0, top_p=1.0)
    assert cfg.synthesis.images.settings() == DiffusionSettings(
        steps=20, guidance_scale=7.5, negative_prompt="blurry",
        scheduler="DPMSolverMultistepScheduler", height=512, width=512, dtype="float16",
    )  # fmt: skip
    with pytest.raises(PairfreeError, match="steps must be at least 1"):
        ImageSynthesisConfig(steps=0)
    with pytest.raises(PairfreeError, match="images.variants must be 1"):
        build_config(ICSDConfig, None, ["synthesis.images.variants=2"])


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
    assert cfg.image_size == 384 and cfg.label_smoothing == 0.1 and not cfg.pretrained_head
    assert cfg.synthesis.group_clip == "hf:openai/clip-vit-base-patch16"
    assert cfg.corpus.cleaning.dedupe is False  # ICSD groups every caption, repeats too
    # batch 64 per process on 8 GPUs: 512 per optimizer step; AdamW decays every parameter
    assert (t.batch_size, t.per_device_batch_size, t.grad_accum) == (512, None, 8)
    assert t.no_decay == [] and t.checkpoint_every == 500
    assert cfg.validation.dataset and cfg.validation.split == "val"  # ICSD's real val split
    assert cfg.corpus.val_fraction == 0.0  # every group trains; the real val split selects
    assert cfg.generation.stop == "[SEP]" and images.guidance_scale == 7.5
    llm = cfg.synthesis.llm
    assert llm.spec == "openai:gpt-3.5-turbo"  # ChatGPT, with its default sampling
    assert (llm.temperature, llm.top_p, llm.max_new_tokens) == (1.0, 1.0, 500)


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


def test_bert_output_head_starts_anew_as_blips_and_pretrained_is_the_option(tiny, tiny_gpt2_dir):
    """BLIP builds a new BertLMHeadModel and loads pretrained weights into its ``bert`` only:
    the head's transform (dense, LayerNorm) and output bias start from a new model's init;
    the word embeddings the head projects with are the pretrained ones."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, BertLMHeadModel

    from pairfree.captioner.cross_attention import load_cross_attention_lm, reset_output_head

    _, _, bert = tiny
    saved = load_file(str(bert / "model.safetensors"))
    head = {k for k in saved if k.startswith("cls.")}
    assert {"cls.predictions.transform.dense.weight", "cls.predictions.bias"} <= head
    with torch.no_grad():  # a stand-in for pretraining: no head parameter at its init value
        for k in head:
            saved[k].normal_(0.5, 0.1)
    pretrained = load_cross_attention_lm(str(bert))
    pretrained.load_state_dict(saved, strict=False)
    kept = dict(pretrained.named_parameters())
    torch.manual_seed(0)
    fresh = load_cross_attention_lm(str(bert), fresh_head=True)
    fresh.load_state_dict(
        {k: v for k, v in saved.items() if not k.startswith("cls.")}, strict=False
    )
    torch.manual_seed(0)
    names = reset_output_head(pretrained)
    blip = BertLMHeadModel(AutoConfig.from_pretrained(bert))  # the parts BLIP makes anew
    assert sorted(names) == sorted(
        n for n, _ in blip.named_parameters() if not n.startswith("bert.")
    )
    params = dict(pretrained.named_parameters())
    transform = "cls.predictions.transform."
    assert torch.equal(params[transform + "LayerNorm.weight"], torch.ones(32))
    assert (
        not params[transform + "LayerNorm.bias"].any() and not params["cls.predictions.bias"].any()
    )
    assert not params[transform + "dense.bias"].any()
    std = float(params[transform + "dense.weight"].std())
    assert abs(std - pretrained.config.initializer_range) < 0.005
    for name, param in params.items():  # the encoder, embeddings and cross-attention kept
        if not name.startswith("cls."):
            assert torch.equal(param, kept[name]), name
    output = pretrained.get_output_embeddings().weight
    assert output is pretrained.get_input_embeddings().weight  # still tied
    # fresh_head=True at load does the same
    assert torch.equal(
        dict(fresh.named_parameters())[transform + "LayerNorm.weight"], torch.ones(32)
    )
    assert not dict(fresh.named_parameters())["cls.predictions.bias"].any()
    # GPT-2's head is its tied embeddings alone: nothing to start anew
    gpt2 = load_cross_attention_lm(str(tiny_gpt2_dir))
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    assert reset_output_head(gpt2) == []
    assert all(torch.equal(v, gpt2.state_dict()[k]) for k, v in before.items())


def test_checkpoint_keeps_the_towers_size_and_captions_at_it(
    tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    """A captioner whose tower reads 48-px images (its CLIP's native size: 32) is saved with
    that size and loaded at it; captioning resizes images to it. A checkpoint written before
    the size was recorded loads at the CLIP's own size."""
    from transformers import AutoTokenizer

    from pairfree.captioner import CheckpointCard, GenerationConfig
    from pairfree.captioner.checkpoint import load_captioner, save_captioner
    from pairfree.captioner.cross_attention import (
        CrossAttentionCaptioner,
        CrossAttentionConfig,
        load_cross_attention_lm,
    )
    from pairfree.clip import load_clip
    from pairfree.errors import BadInputError
    from pairfree.pipeline import Captioner

    clip = load_clip(f"hf:{tiny_clip_dir}")
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    card = CheckpointCard("icsd", f"hf:{tiny_clip_dir}", generation=GenerationConfig(
        num_beams=2, max_new_tokens=4, stop="."))  # fmt: skip
    images = [tmp_path / f"{c}.png" for c in ("red", "navy")]
    for path in images:
        Image.new("RGB", (70, 50), path.stem).save(path)

    def saved(size: int | None, out: Path) -> CrossAttentionCaptioner:
        vision = clip.vision_tower(size)
        config = CrossAttentionConfig(lm=str(tiny_gpt2_dir), grid_width=32, prefix_length=0,
                                      image_encoder=True, image_size=vision.pixels.image_size)  # fmt: skip
        torch.manual_seed(0)
        model = CrossAttentionCaptioner(config, load_cross_attention_lm(str(tiny_gpt2_dir)),
                                        separator_ids=[25], vision=vision).eval()  # fmt: skip
        save_captioner(model, tokenizer, out, card)
        return model

    model = saved(48, tmp_path / "at48")
    meta = json.loads((tmp_path / "at48" / "config.json").read_text())
    assert meta["captioner"]["image_size"] == 48
    loaded, _, _ = load_captioner(tmp_path / "at48")
    assert loaded.vision.pixels.image_size == 48 and loaded.vision.grid_shape == (37, 32)
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    expected = Captioner(model, tokenizer, clip, generation=card.generation).caption(images)
    assert Captioner.from_pretrained(tmp_path / "at48").caption(images) == expected

    saved(None, tmp_path / "old")  # an older checkpoint: no image_size in its config
    path = tmp_path / "old" / "config.json"
    meta = json.loads(path.read_text())
    assert meta["captioner"].pop("image_size") == 32
    path.write_text(json.dumps(meta))
    assert load_captioner(tmp_path / "old")[0].vision.pixels.image_size == 32
    # a recorded size the CLIP's tower cannot take is named, not a shape mismatch
    meta["captioner"]["image_size"] = 50
    path.write_text(json.dumps(meta))
    with pytest.raises(BadInputError, match="its image tower.*not a multiple of its 8-px"):
        load_captioner(tmp_path / "old")


def test_captions_are_grouped_by_the_grouping_clip_repeats_included(tiny, tmp_path, monkeypatch):
    """ICSD groups by its own CLIP's text embeddings (ViT-B/16; the run's CLIP only where none
    is named) and groups every caption of the corpus, a repeated one as often as it occurs."""
    import pairfree.recipes.icsd as icsd
    from pairfree.clip import load_clip
    from pairfree.recipes import get_recipe
    from pairfree.synth.text import group_captions

    _, world, bert = tiny
    lines = world.corpus.read_text().splitlines()[:6]
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([*lines, lines[0]]) + "\n")
    assert icsd.ICSDConfig().synthesis.group_clip == "hf:openai/clip-vit-base-patch16"

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    monkeypatch.setattr(icsd, "summarize_stage", stop)
    overrides = [a for a in icsd_args(world, bert, tmp_path / "run") if "=" in a]
    overrides += [f"corpus.path={corpus}", "synthesis.group_clip=world:builtin",
                  "clip=world:builtin", f"synthesis.out={tmp_path / 'syn'}"]  # fmt: skip
    loaded = []
    real_load = icsd.load_clip

    def load(spec, **kwargs):
        loaded.append(spec)
        return real_load(spec, **kwargs)

    monkeypatch.setattr(icsd, "load_clip", load)
    with pytest.raises(Stop):
        icsd.train_icsd(get_recipe("icsd").build_config({}, overrides), progress=False)
    assert loaded == ["world:builtin", "world:builtin"]  # the run's, then the grouping CLIP
    request = json.loads((tmp_path / "syn" / "groups" / "request.json").read_text())
    assert request["clip"] == "world:builtin"
    groups = read_jsonl(tmp_path / "syn" / "groups" / "groups.jsonl")
    texts = [*lines, lines[0]]
    assert [g["captions"][0] for g in groups] == texts  # the repeat is grouped again
    clip = load_clip("world:builtin")
    expected = group_captions([str(i) for i in range(7)], texts, clip.encode_texts(texts),
                              tmp_path / "expected", k=5)  # fmt: skip
    assert [g["captions"] for g in groups] == [g.captions for g in expected]
    # grouped already: the grouping CLIP is not loaded again
    loaded.clear()
    with pytest.raises(Stop):
        icsd.train_icsd(get_recipe("icsd").build_config({}, overrides), progress=False)
    assert loaded == ["world:builtin"]
    # corpus.cleaning.dedupe=true leaves the repeat out
    with pytest.raises(Stop):
        icsd.train_icsd(get_recipe("icsd").build_config({}, [*overrides,
                        "corpus.cleaning.dedupe=true", f"features={tmp_path / 'f'}"]), progress=False)  # fmt: skip
    groups = read_jsonl(tmp_path / "syn" / "groups" / "groups.jsonl")
    assert [g["captions"][0] for g in groups] == lines


def test_world_icsd_runs_keep_the_world_clips_size_and_group_with_it(tmp_path):
    """The world CLIP's CNN tower cannot read ICSD's 384 px and the world has no ViT-B/16:
    the demo's and benchmark's ICSD runs use the world CLIP's own size and its text tower."""
    from pairfree.clip import load_clip
    from pairfree.demo.methods import ICSD_METHODS, DemoConfig, method_config

    cfg = DemoConfig(out=str(tmp_path), n_corpus=20, n_test=2)
    for method in ICSD_METHODS:
        icsd = method_config(cfg, method)
        assert icsd.image_size is None and icsd.synthesis.group_clip is None
        assert icsd.label_smoothing == 0.1 and not icsd.pretrained_head  # ICSD's own
        load_clip(icsd.clip).vision_tower(icsd.image_size)  # takes it
