"""PCM-Net: the patch-wise cross-modal mix-up, its encoder-decoder and the CLIP-weighted
cross-entropy, on constructed examples."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from synthetic_helpers import synthesize_world
from torch import nn

from pairfree.captioner.patch_mix import PatchMixConfig, patch_mix, salient_concepts
from pairfree.captioner.pcm import PCMCaptioner, PCMConfig, clip_weighted_loss, pool_patches
from pairfree.errors import PairfreeError

E = torch.eye(6)  # six orthogonal concept embeddings


def test_salient_concepts_are_the_top_k_by_cosine_above_the_threshold():
    image = (E[1] + 0.99 * E[4] + 0.9 * E[0])[None]
    rows, kept = salient_concepts(image, E, PatchMixConfig(concepts=3))
    assert rows[0].tolist() == [1, 4, 0] and kept.all()
    _, kept = salient_concepts(image, E, PatchMixConfig(concepts=3, threshold=0.05))
    assert kept[0].tolist() == [True, True, False]  # softmax(cos / 0.01): .64, .35, .002


def test_mix_up_picks_the_patches_of_the_top_patch_concept_pairs():
    image = (E[1] + E[2])[None]  # concepts 1 and 2 are salient (K = 2)
    patches = torch.stack([E[1], E[2] + 0.2 * E[1], E[3], 0.5 * E[1] + E[5]])[None]
    mix = patch_mix(image, patches, E, PatchMixConfig(concepts=2, patches=2))
    assert sorted(mix.concepts[0].tolist()) == [1, 2]
    assert mix.replaced[0].tolist() == [True, True, False, False]
    assert torch.allclose(mix.stand_ins[0, 0], E[1], atol=1e-6)  # its concept's embedding
    assert torch.allclose(mix.stand_ins[0, 1], E[2], atol=1e-6)
    # three pairs: patch 0 has both of the next two (cos 0.98 with 1, ~0 with 2): still
    # at most M patches, and patch 3 (cos 0.45 with concept 1) joins
    mix = patch_mix(image, patches, E, PatchMixConfig(concepts=2, patches=3))
    assert mix.replaced[0].tolist() == [True, True, False, True]
    # M below 1 is a fraction of N x K pairs: 0.25 * 8 = 2
    mix = patch_mix(image, patches, E, PatchMixConfig(concepts=2, patches=0.25))
    assert mix.replaced[0].tolist() == [True, True, False, False]


def tiny_config(**kw):
    base = dict(vocab_size=12, embed_dim=6, grid_width=6, grid_tokens=4, class_tokens=1,
                concepts=6, width=6,
                heads=2, ffn=8, encoder_layers=1, decoder_layers=1, attention_dropout=0.0,
                hidden_dropout=0.0, visual_dropout=0.0, token_dropout=0.0, head_dropout=0.0,
                mix=PatchMixConfig(concepts=2, patches=2))  # fmt: skip
    return PCMConfig(**{**base, **kw})


def identity_model(cfg):
    """Identity projections, no positions or token types: the visual tokens before ReLU and
    LayerNorm are the grid's rows and the concepts themselves."""
    model = PCMCaptioner(cfg)
    model.set_concepts(E)
    with torch.no_grad():
        for linear in (model.patches, model.stand_ins, model.global_embed):
            linear.weight.copy_(torch.eye(6))
            linear.bias.zero_()
        model.positions.zero_()
        model.token_types.weight.zero_()
    return model


def test_training_replaces_exactly_the_selected_patches_and_inference_appends_them():
    model = identity_model(tiny_config())
    image = (E[1] + E[2])[None]
    patches = torch.stack([E[1], E[2] + 0.2 * E[1], E[3], 0.5 * E[1] + E[5]])
    grid = torch.cat((E[0][None], patches))[None]  # a class token first, then four patches

    def seen(rows):  # what the encoder reads of these rows
        return model.visual_norm(F.relu(torch.stack(rows)))[None]

    x, padding = model.train().visual_tokens(image, image, grid, grid)
    expected = seen([image[0], E[1], E[2], patches[2], patches[3]])  # patches 0, 1 replaced
    assert torch.allclose(x, expected, atol=1e-5) and not padding.any()

    x, padding = model.eval().visual_tokens(image, image, grid, grid)
    assert x.shape == (1, 9, 6)  # global, the four patches, their four stand-ins
    assert torch.allclose(x[:, :5], seen([image[0], *patches]), atol=1e-5)
    assert torch.allclose(x[:, 5:7], seen([E[1], E[2]]), atol=1e-5)
    assert padding[0].tolist() == [False] * 5 + [False, False, True, True]


def test_without_mix_up_the_patches_are_read_as_they_are():
    model = identity_model(tiny_config(mix=None, class_tokens=0))
    grid = torch.stack([E[1], E[2], E[3], E[4]])[None]
    for mode in (model.train(), model.eval()):
        x, padding = mode.visual_tokens(E[1][None], E[1][None], grid, grid)
        assert x.shape == (1, 5, 6) and not padding.any()
    with pytest.raises(ValueError, match="grid must be"):
        model.visual_tokens(E[1][None], E[1][None], torch.zeros(1, 5, 6), torch.zeros(1, 5, 6))


def test_the_weighted_loss_is_the_weighted_token_mean_times_the_batch_focal_factor():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    targets = torch.tensor([[1, 4, -100], [0, 2, 3]])
    weights = torch.tensor([0.5, 1.0])
    # no smoothing, no focal term: the weighted mean of -log p over the five real tokens
    p = logits.softmax(-1)
    nll = [-(p[0, 0, 1].log()) * 0.5, -(p[0, 1, 4].log()) * 0.5,
           -(p[1, 0, 0].log()), -(p[1, 1, 2].log()), -(p[1, 2, 3].log())]  # fmt: skip
    plain = clip_weighted_loss(logits, targets, weights, smoothing=0.0, gamma=0.0)
    assert torch.allclose(plain, torch.stack(nll).mean())
    # the original's criterion: KLDivLoss against the smoothed target, then the mean over the
    # outer product of the tokens' losses and their (1 - p)^2 (gamma_type "batch")
    real = targets.flatten() != -100
    logp = F.log_softmax(logits.flatten(0, 1), -1)[real]
    target = targets.flatten()[real]
    true = torch.full_like(logp, 0.1 / 4).scatter(1, target[:, None], 0.9)
    token = nn.KLDivLoss(reduction="none")(logp, true).sum(1) * torch.tensor([0.5] * 2 + [1.0] * 3)
    focal = (1 - logp.exp().gather(1, target[:, None])) ** 2
    reference = (token[None, :] * focal).mean()
    loss = clip_weighted_loss(logits, targets, weights)
    assert torch.allclose(loss, reference)
    loss.backward()  # the focal factor is not detached: every real token's logits get gradient
    assert logits.grad[0, 2].abs().sum() == 0 and (logits.grad[1].abs().sum(-1) > 0).all()


def test_the_captioner_learns_and_generates_its_training_captions():
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=10, width=16, heads=2, ffn=32, grid_tokens=4, max_tokens=5)
    model = PCMCaptioner(cfg)
    model.set_concepts(F.normalize(torch.randn(6, 6), dim=-1))
    images = F.normalize(torch.randn(3, 6), dim=-1)
    grids = torch.randn(3, 5, 6)
    dense = torch.randn(3, 5, 6)
    captions = torch.tensor([[3, 4, 5, 0], [6, 7, 0, -100], [8, 9, 3, 0]])  # 0 ends ("."")
    inputs = torch.cat((torch.zeros(3, 1, dtype=torch.long), captions[:, :-1].clamp(min=0)), 1)
    weights = torch.ones(3)
    optimizer = torch.optim.Adam(p for p in model.parameters() if p.requires_grad)
    losses = []
    model.train()
    for _ in range(150):
        loss = clip_weighted_loss(model(images, images, grids, dense, inputs), captions, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
    model.eval()
    out = model.generate(
        images, images, grids, dense, num_beams=3, max_new_tokens=5, eos_token_id=0
    )
    assert out == [[3, 4, 5], [6, 7], [8, 9, 3]]


def test_decoding_with_the_cache_equals_rerunning_the_whole_sequence():
    """One position per step over the cached layer inputs gives the logits of re-running the
    sequence, so greedy and beam search pick the same captions either way."""
    from pairfree.captioner import generation

    torch.manual_seed(1)
    cfg = tiny_config(vocab_size=30, width=16, heads=2, ffn=32, decoder_layers=2, max_tokens=9)
    model = PCMCaptioner(cfg).eval()
    model.set_concepts(F.normalize(torch.randn(6, 6), dim=-1))
    images = F.normalize(torch.randn(4, 6), dim=-1)
    grids, dense = torch.randn(4, 5, 6), torch.randn(4, 5, 6)
    context = model.encode(images, images, grids, dense)
    ids = torch.randint(1, 30, (4, 7))
    whole = model.decoder(input_ids=ids, **context).logits
    step = model.decoder(input_ids=ids[:, :3], use_cache=True, **context)
    stepped = [step.logits]
    for i in range(3, 7):
        step = model.decoder(input_ids=ids[:, i : i + 1], past_key_values=step.past_key_values,
                             use_cache=True, **context)  # fmt: skip
        stepped.append(step.logits)
    torch.testing.assert_close(torch.cat(stepped, dim=1), whole, rtol=1e-5, atol=1e-5)
    prefix = model.decoder.words(torch.zeros(4, 1, dtype=torch.long))
    for beams in (1, 3):
        found = [generation.generate(model.decoder, prefix, context=context, use_cache=cached,
                                     num_beams=beams, max_new_tokens=8, eos_token_id=0)
                 for cached in (True, False)]  # fmt: skip
        assert found[0] == found[1] and any(len(c) > 2 for c in found[0])


def test_pooling_averages_each_block_of_the_patch_map_and_keeps_the_class_token():
    patches = torch.arange(16.0).reshape(1, 16, 1).repeat(2, 1, 3)  # a 4 x 4 map, row-major
    grid = torch.cat((torch.full((2, 1, 3), -7.0), patches), dim=1)
    pooled = pool_patches(grid, 1, 2)
    # blocks: (0 1 4 5), (2 3 6 7), (8 9 12 13), (10 11 14 15)
    assert pooled.shape == (2, 5, 3) and pooled[0, 0].tolist() == [-7.0] * 3
    assert pooled[1, 1:, 0].tolist() == [2.5, 4.5, 10.5, 12.5]
    assert pool_patches(grid, 1, 1) is grid and pool_patches(grid, 1, 4)[0, 1, 0] == 7.5
    with pytest.raises(ValueError, match="square"):
        pool_patches(grid, 1, 3)  # 4 is not a multiple of 3
    with pytest.raises(ValueError, match="square"):
        pool_patches(grid[:, :13], 1, 2)  # 12 patches are no square


def test_config_round_trips_and_rejects_bad_values():
    cfg = tiny_config()
    assert PCMConfig.from_dict(cfg.to_dict()) == cfg
    assert PCMConfig.from_dict(replace(cfg, mix=None).to_dict()).mix is None
    with pytest.raises(ValueError, match="unknown"):
        PCMConfig.from_dict({"layers": 3})
    with pytest.raises(ValueError, match="multiple"):
        tiny_config(width=7)
    with pytest.raises(ValueError, match="patch mix-up"):
        PatchMixConfig(patches=0)


# --------------------------------------------------------------------------- the recipe
@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    """A tiny world and one synthetic image per corpus caption."""
    return synthesize_world(
        tmp_path_factory.mktemp("pcmnet"), n_corpus=48, n_test=6, n_val=4, seed=3
    )


def pcm_args(root, world, out, *extra) -> list[str]:
    return [f"corpus.path={world.corpus}", "clip=world:builtin", f"images={root / 'own'}",
            f"concepts.vocabulary={world.entities}", "min_word_count=1", "model.width=32",
            "model.heads=2", "model.ffn=64", "model.encoder_layers=1", "model.decoder_layers=1",
            "train.max_steps=40", "train.batch_size=8", "train.warmup_steps=4", "train.lr=3e-3",
            "train.checkpoint_every=10", "train.log_every=5", f"train.output_dir={out}",
            f"features={root / 'features'}", *extra]  # fmt: skip


def run_cli(args, **kw):
    import os
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "pairfree.cli", "train", "pcmnet",
                             "--no-progress", *args], env=dict(os.environ, HF_HUB_OFFLINE="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)  # fmt: skip


def test_pcmnet_learns_and_a_saved_copy_captions_from_another_folder(synthesized, tmp_path):
    import json
    import shutil

    from pairfree import Captioner, experiment
    from pairfree.cli import main

    root, world = synthesized
    out = tmp_path / "run"
    assert main(["train", "pcmnet", "--no-progress", *pcm_args(root, world, out)]) == 0
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [h["loss"] for h in history if "loss" in h]
    assert losses[-1] < 0.8 * losses[0]
    meta = json.loads((out / "last" / "config.json").read_text())
    assert meta["family"] == "pcm" and meta["card"]["recipe"] == "pcmnet"
    assert meta["captioner"]["class_tokens"] == 0 and meta["captioner"]["mix"]["concepts"] == 5
    assert meta["card"]["conditioning"]["noise_variance"] == 0.016

    captioner = Captioner.from_pretrained(out / "last")
    concepts = captioner.clip.encode_texts(["x"])  # the concept bank travels in the weights
    assert captioner.model.concept_embeds.shape == (15, concepts.shape[1])
    images = sorted((world.root / "images").glob("test_*.png"))[:3]
    captions = captioner([str(p) for p in images])
    assert all(isinstance(c, str) for c in captions)
    test = experiment.TestSet.load(world.dataset, split="test")
    by_id = experiment.caption_test_set(captioner, test)  # the experiment runner's path
    assert [by_id[p.stem] for p in images] == captions

    copy = captioner.save_pretrained(tmp_path / "elsewhere" / "copy")
    shutil.move(out, tmp_path / "moved")
    shutil.move(root / "features", tmp_path / "features-moved")  # nothing outside the copy
    try:
        again = Captioner.from_pretrained(copy)
        assert again([str(p) for p in images]) == captions
        listing = tmp_path / "captions.json"
        assert main(["caption", str(copy), *map(str, images), "--out", str(listing), "-q"]) == 0
        assert [r["caption"] for r in json.loads(listing.read_text())] == captions
    finally:
        shutil.move(tmp_path / "features-moved", root / "features")


@pytest.mark.parametrize("off", ["mixup", "weighting"])
def test_each_ablation_trains_and_says_so(synthesized, tmp_path, off):
    import json

    from pairfree.cli import main

    root, world = synthesized
    out = tmp_path / off
    assert main(["train", "pcmnet", "--no-progress",
                 *pcm_args(root, world, out, f"{off}=false", "train.max_steps=2")]) == 0  # fmt: skip
    assert json.loads((out / "config.json").read_text())[off] is False
    mix = json.loads((out / "last" / "config.json").read_text())["captioner"]["mix"]
    assert (mix is None) == (off == "mixup")


def test_each_pair_weighs_clamp_alpha_cosine_or_one_without_weighting(synthesized, tmp_path):
    from PIL import Image

    from pairfree.clip import load_clip
    from pairfree.config import build_config
    from pairfree.job import Job
    from pairfree.recipes.pcmnet import PCMNetConfig, pcm_data

    root, world = synthesized
    clip = load_clip("world:builtin")
    for alpha, weighting in ((2.5, True), (0.5, True), (2.5, False)):
        cfg = build_config(PCMNetConfig, None, [*pcm_args(root, world, tmp_path / "r"),
                                                f"alpha={alpha}", f"weighting={weighting}"])  # fmt: skip
        made = pcm_data(cfg, clip, Job(progress=False))
        image = clip.encode_images([Image.open(made.files[3]).convert("RGB")])
        cosine = F.cosine_similarity(image, clip.encode_texts([made.texts[3]]))[0]
        expected = min(1.0, max(0.0, alpha * float(cosine))) if weighting else 1.0
        assert float(made.data.weights[3]) == pytest.approx(expected, abs=1e-5)
        assert made.data.captions[3][-1] == 0 and len(made.data.captions[3]) <= 20  # ends with "."


def test_killed_pcmnet_run_resumes_to_the_same_weights(synthesized, tmp_path):
    from resume_helpers import resumed_run_equals_uninterrupted

    root, world = synthesized
    extra = ("train.max_steps=8", "train.checkpoint_every=2")
    resumed_run_equals_uninterrupted(run_cli, lambda out: pcm_args(root, world, out, *extra),
                                     tmp_path, 2)  # fmt: skip


def test_a_vit_grid_pooled_2x2_trains_and_captions_and_a_resnet_like_one_is_refused(
    synthesized, tmp_path
):
    """``model.grid_pool 2`` (ViT-L/14's setting) on a tiny ViT CLIP: its 4 x 4 patches are
    read as 2 x 2 in training and in captioning; the world CLIP, whose attention pool
    positions each token, refuses it before any data is read."""
    import json

    from tiny_models import save_tiny_clip

    from pairfree import Captioner
    from pairfree.cli import main

    root, world = synthesized
    clip = save_tiny_clip(tmp_path / "clip")
    out = tmp_path / "run"
    assert main(["train", "pcmnet", "--no-progress",
                 *pcm_args(root, world, out, f"clip=hf:{clip}", "model.grid_pool=2",
                           f"features={tmp_path / 'f'}", "train.max_steps=2")]) == 0  # fmt: skip
    saved = json.loads((out / "last" / "config.json").read_text())["captioner"]
    assert (saved["grid_pool"], saved["grid_tokens"], saved["class_tokens"]) == (2, 4, 1)
    captioner = Captioner.from_pretrained(out / "last")
    seen, read = [], captioner.model.visual_tokens

    def spy(image_embeds, condition, grid, grid_embeds):  # what the captioner reads
        seen.append(grid.shape)
        return read(image_embeds, condition, grid, grid_embeds)

    captioner.model.visual_tokens = spy
    images = sorted((world.root / "images").glob("test_*.png"))[:2]
    assert all(isinstance(c, str) for c in captioner([str(p) for p in images]))
    assert seen and all(shape[1] == 1 + 4 for shape in seen)  # the class token, 4 pooled

    from pairfree.config import build_config
    from pairfree.recipes.pcmnet import PCMNetConfig, train_pcmnet

    cfg = build_config(PCMNetConfig, None, [*pcm_args(root, world, tmp_path / "w"),
                                            "model.grid_pool=2"])  # fmt: skip
    with pytest.raises(PairfreeError, match="grid_pool 2"):
        train_pcmnet(cfg, progress=False)
    assert not (tmp_path / "w").exists()


def test_bad_inputs_fail_before_any_model_loads(synthesized, tmp_path):
    from pairfree.config import build_config
    from pairfree.recipes.pcmnet import PCMNetConfig, train_pcmnet

    root, world = synthesized
    for bad, message in ((f"images={tmp_path / 'none'}", "synthesize images"),
                         ("concepts.vocabulary=null", "concepts.vocabulary"),
                         (f"concepts.vocabulary={tmp_path / 'none.txt'}", "none.txt")):  # fmt: skip
        cfg = build_config(PCMNetConfig, None, [*pcm_args(root, world, tmp_path / "r"), bad,
                                                "clip=hf:/no/such/clip"])  # fmt: skip
        with pytest.raises(PairfreeError, match=message):
            train_pcmnet(cfg, progress=False)
    for bad in ("alpha=0", "gamma=-1", "label_smoothing=1", "min_word_count=0"):
        with pytest.raises(PairfreeError):
            build_config(PCMNetConfig, None, [bad])


# --------------------------------------------------------------------------- configs
# jianjieluo/PCM-Net configs/{mscoco_sd,flickr_sd}/{vit_b32,vit_l14}/*.yaml and the defaults'
# losses: (trained on, CLIP, LOSSES.ALPHA, BERT dropout, patch pooling, tested on)
SETTINGS = {
    "coco": ("coco", "clip-vit-base-patch32", 2.5, 0.2, 1, "dataset_coco"),
    "coco_vitl14": ("coco", "clip-vit-large-patch14", 4.0, 0.25, 2, "dataset_coco"),
    "flickr30k": ("flickr30k", "clip-vit-base-patch32", 2.5, 0.2, 1, "dataset_flickr30k"),
    "coco_to_flickr30k": ("coco", "clip-vit-base-patch32", 2.5, 0.2, 1, "dataset_flickr30k"),
    "flickr30k_to_coco": ("flickr30k", "clip-vit-base-patch32", 2.5, 0.2, 1, "dataset_coco"),
    "nocaps_coco": ("coco", "clip-vit-base-patch32", 2.5, 0.2, 1, "nocaps"),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_paper_configs_resolve_to_the_originals_settings(name):
    from pathlib import Path

    from pairfree.config import read_yaml
    from pairfree.recipes import get_recipe
    from pairfree.recipes.pcmnet import PCMNetConfig

    data = read_yaml(Path(__file__).parents[1] / "configs" / "pcmnet" / f"{name}.yaml")
    assert data.pop("recipe") == "pcmnet"
    evaluation = data.pop("evaluation")
    cfg = get_recipe("pcmnet").build_config(data)
    trained_on, clip, alpha, dropout, pool, tested_on = SETTINGS[name]
    assert cfg.corpus.path == f"data/dataset_{trained_on}.json" and cfg.clip.endswith(clip)
    assert cfg.images == f"runs/synthetic/{trained_on}/own" and cfg.concepts.ensemble
    assert (cfg.alpha, cfg.label_smoothing, cfg.gamma, cfg.noise_variance) == (alpha, 0.1, 2.0,
                                                                               0.016)  # fmt: skip
    assert cfg.mixup and cfg.weighting
    m = cfg.model
    assert (m.width, m.heads, m.ffn, m.encoder_layers, m.decoder_layers) == (512, 8, 2048, 3, 3)
    assert (m.attention_dropout, m.hidden_dropout, m.visual_dropout, m.token_dropout,
            m.head_dropout, m.max_tokens, m.grid_pool) == (0.3, dropout, 0.5, 0.1, 0.5, 20,
                                                           pool)  # fmt: skip
    assert m.mix == PatchMixConfig(concepts=5, patches=5.0, temperature=0.01, threshold=0.0)
    t = cfg.train
    assert (t.epochs, t.batch_size, t.warmup_steps, t.schedule, t.weight_decay) == (
        12, 32, 10000, "noam", 0.0
    )  # fmt: skip
    assert t.lr == pytest.approx((512 * 10000) ** -0.5, rel=1e-6)
    assert (t.grad_clip, t.grad_clip_mode) == (0.1, "value")
    g = cfg.generation
    assert (g.num_beams, g.max_new_tokens, g.stop, g.stop_at_eos, g.length_penalty) == (
        3, 20, None, True, 0.0
    )  # fmt: skip
    assert tested_on in evaluation["dataset"]
    defaults = PCMNetConfig()  # the dataclass holds the COCO ViT-B/32 settings
    if name == "coco":
        assert (cfg.model, cfg.generation) == (defaults.model, defaults.generation)
        assert cfg.train.lr == pytest.approx(defaults.train.lr, rel=1e-6)


def test_the_sync_config_is_the_coco_config_on_syncs_defaults():
    from pathlib import Path

    from pairfree.config import read_yaml
    from pairfree.recipes import get_recipe
    from pairfree.synth.reassign import ReassignConfig

    folder = Path(__file__).parents[1] / "configs" / "pcmnet"
    coco, sync = (read_yaml(folder / f"{name}.yaml") for name in ("coco", "coco_sync"))
    assert sync.pop("reassign") and sync["train"].pop("output_dir") != coco["train"].pop(
        "output_dir"
    )
    assert sync == coco  # the feature cache too: its stores are named by what they hold
    data = read_yaml(folder / "coco_sync.yaml")
    cfg = get_recipe("pcmnet").build_config(
        {k: v for k, v in data.items() if k not in ("recipe", "evaluation")}
    )
    assert cfg.reassign == ReassignConfig()  # SigLIP2, the paraphrase MiniLM, K 15, K_r 2, 90 %
