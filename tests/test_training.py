"""CapDec through the shared trainer: learning, exact resume after SIGKILL, 2-process DDP."""

import json
import os
import subprocess
import sys

import pytest
import torch
from resume_helpers import resumed_run_equals_uninterrupted
from safetensors.torch import load_file

from pairfree.clip import load_clip
from pairfree.config import build_config
from pairfree.data import load_image, read_images
from pairfree.errors import PairfreeError
from pairfree.job import Job
from pairfree.recipes.capdec import CapDecConfig, paired_image_condition, train_capdec
from pairfree.world import make_world

COLORS = ["red", "blue", "green", "yellow"]
SHAPES = ["circle", "square", "triangle", "star"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    lines = [f"a {c} {s} on the left." for c in COLORS for s in SHAPES]
    path.write_text("\n".join(lines) + "\n")
    return path


def overrides(corpus, clip_dir, gpt2_dir, out, **extra):
    base = {
        "corpus.path": corpus,
        "corpus.val_fraction": 0.0,
        "clip": f"hf:{clip_dir}",
        "features": out.parent / "features",
        "model.lm": gpt2_dir,
        "model.prefix_length": 4,
        "model.clip_length": 4,
        "model.mapper_layers": 1,
        "train.output_dir": out,
        "train.batch_size": 8,
        "train.warmup_steps": 2,
        "train.lr": 3e-3,
        "train.log_every": 1,
        "train.epochs": 100,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run_cli(args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen(
        [sys.executable, "-m", "pairfree.cli", "train", "capdec", "--no-progress", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def weights(run_dir):
    return load_file(str(run_dir / "last" / "model.safetensors"))


def test_capdec_loss_falls_well_below_its_start(corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path):
    args = overrides(
        corpus,
        tiny_clip_dir,
        tiny_gpt2_dir,
        tmp_path / "run",
        **{"train.max_steps": 40, "train.schedule": "constant", "train.lr": 1e-2},
    )
    result = train_capdec(build_config(CapDecConfig, None, args), progress=False)
    losses = [r["loss"] for r in result.history if "loss" in r]
    assert result.global_step == 40
    assert losses[0] > 9 and sum(losses[-5:]) / 5 < 0.5 * losses[0], losses
    assert (tmp_path / "run" / "last" / "model.safetensors").exists()
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))

    changed = build_config(CapDecConfig, None, [*args, "train.lr=0.5"])
    with pytest.raises(PairfreeError, match="different config"):
        train_capdec(changed, progress=False)


def test_killed_run_resumes_to_the_same_weights(corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path):
    extra = {"train.max_steps": 8, "train.checkpoint_every": 2}
    resumed_run_equals_uninterrupted(
        run_cli, lambda out: overrides(corpus, tiny_clip_dir, tiny_gpt2_dir, out, **extra),
        tmp_path, 4)  # fmt: skip


def launch_two(args: list[str]) -> None:
    """``pairfree train capdec`` in two CPU processes (torchrun; gloo). ``accelerate launch
    --cpu --num_processes 2`` would start one process only."""
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "-m", "pairfree.cli", "train", "capdec", "--no-progress", *args],
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr


def max_difference(a: dict, b: dict) -> float:
    return max(float((a[key] - b[key]).abs().max()) for key in a)


@pytest.fixture(scope="module")
def deterministic_gpt2(tiny_gpt2_dir, tmp_path_factory):
    """The tiny GPT-2 without dropout: dropout masks are drawn per process, like noise."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    out = tmp_path_factory.mktemp("gpt2-no-dropout")
    lm = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir, resid_pdrop=0.0, embd_pdrop=0.0,
                                         attn_pdrop=0.0)  # fmt: skip
    lm.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_gpt2_dir).save_pretrained(out)
    return out


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(corpus, tiny_clip_dir, deterministic_gpt2, tmp_path):
    """Without randomness (no noise, no dropout) two processes learn what one learns: each
    takes half of every batch, and the loss is weighted by caption tokens across both. The
    two-process run gives its batch per device: 4 each, a global batch of 8, as the one
    process' batch_size 8."""
    extra = {"train.max_steps": 4, "noise.variance": 0.0}
    one = run_cli(overrides(corpus, tiny_clip_dir, deterministic_gpt2, tmp_path / "one", **extra))
    assert one.wait(timeout=300) == 0, one.stdout.read()
    per_device = {**extra, "train.batch_size": "null", "train.per_device_batch_size": 4}
    launch_two(overrides(corpus, tiny_clip_dir, deterministic_gpt2, tmp_path / "two", **per_device))
    state = json.loads(
        next((tmp_path / "two" / "checkpoints").glob("*/trainer_state.json")).read_text()
    )
    assert state["num_processes"] == 2
    for run in ("one", "two"):
        session = json.loads((tmp_path / run / "run.json").read_text())["sessions"][0]
        assert session["global_batch"] == 8
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.slow
def test_noise_under_ddp_is_drawn_per_process_and_reproducible(
    corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    """The contract with noise on (and dropout): every process draws its own stream, seeded by
    the run seed and its rank (accelerate's set_seed(device_specific=True)), so a 2-process run
    is not the 1-process run, but the same launch gives the same weights every time."""
    extra = {"train.max_steps": 4, "noise.variance": 0.016}
    for name in ("two-a", "two-b"):
        launch_two(overrides(corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path / name, **extra))
    one = run_cli(overrides(corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "one", **extra))
    assert one.wait(timeout=300) == 0, one.stdout.read()
    a, b = weights(tmp_path / "two-a"), weights(tmp_path / "two-b")
    assert max_difference(a, b) == 0.0
    assert max_difference(a, weights(tmp_path / "one")) > 1e-4


@pytest.mark.parametrize("stop_at_eos", [None, True])  # the default, and the option
def test_capdec_targets_are_the_caption_tokens_only_as_its_train_py(
    corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path, monkeypatch, stop_at_eos
):
    """CapDec's train.py trains on GPT-2's encoding of each caption, nothing appended, and its
    generate_beam never stops at end-of-text; ``generation.stop_at_eos: true`` ends every
    target with end-of-text and stops decoding there."""
    from transformers import AutoTokenizer

    from pairfree.pipeline import Captioner
    from pairfree.recipes import capdec

    setups = []
    setup = capdec.text_only_setup
    monkeypatch.setattr(capdec, "text_only_setup", lambda *a, **kw: setups.append(setup(*a, **kw))
                        or setups[-1])  # fmt: skip
    extra = {"train.max_steps": 1} | (
        {} if stop_at_eos is None else {"generation.stop_at_eos": True}
    )
    args = overrides(corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "run", **extra)
    train_capdec(build_config(CapDecConfig, None, args), progress=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    ends = [tokenizer.eos_token_id] if stop_at_eos else []
    original = sorted(tokenizer.encode(c) + ends for c in corpus.read_text().splitlines())
    assert sorted(setups[0].train_data.tokens.ids) == original
    decoding = Captioner.from_pretrained(tmp_path / "run" / "last").generation
    eos = decoding.generate_kwargs(tokenizer)["eos_token_id"]
    assert eos == (tokenizer.eos_token_id if stop_at_eos else None)


def test_training_warns_when_captions_never_end_where_decoding_stops(
    tiny_clip_dir, tiny_gpt2_dir, tmp_path, caplog
):
    """Captions without the stop text ("." by default) and no end-of-text target: the
    captioner never learns to stop, so training says so, naming the fix; with periods, or
    with generation.stop_at_eos, it is quiet."""
    from pairfree.captioner import GenerationConfig
    from pairfree.training.fitting import warn_if_captions_never_stop

    bare = tmp_path / "bare.txt"
    bare.write_text("\n".join(f"a {c} {s} on the left" for c in COLORS for s in SHAPES) + "\n")
    args = overrides(bare, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "run", **{"train.max_steps": 1})
    with caplog.at_level("WARNING", logger="pairfree"):
        train_capdec(build_config(CapDecConfig, None, args), progress=False)
    warned = [r.getMessage() for r in caplog.records if "stop_at_eos" in r.getMessage()]
    n = len(COLORS) * len(SHAPES)
    assert (
        len(warned) == 1 and f"0 of {n} training captions end with the stop text '.'" in warned[0]
    )
    assert "max_new_tokens=67" in warned[0] and "generation.stop_at_eos=true" in warned[0]

    caplog.clear()
    with caplog.at_level("WARNING", logger="pairfree"):
        warn_if_captions_never_stop(
            ["a cat.", "a dog.", "a cow"], GenerationConfig(stop_at_eos=False)
        )
        warn_if_captions_never_stop(["a cat", "a dog"], GenerationConfig(stop_at_eos=True))
    assert not caplog.records
    with caplog.at_level("WARNING", logger="pairfree"):
        warn_if_captions_never_stop(["a cat."], GenerationConfig(stop=None, stop_at_eos=False))
    assert "0 of 1 training captions" in caplog.records[0].getMessage()


def test_paired_upper_bound_conditions_each_caption_on_its_own_image(
    tiny_clip_dir, tiny_gpt2_dir, tmp_path
):
    world = make_world(tmp_path / "w", n_train_images=5, n_val=0, n_test=0, n_corpus=0, seed=3)
    args = overrides(world.dataset, tiny_clip_dir, tiny_gpt2_dir, tmp_path / "run",
                     **{"condition": "image", "noise.variance": 0.0, "train.max_steps": 3})  # fmt: skip
    cfg = build_config(CapDecConfig, None, args)
    clip = load_clip(cfg.clip)
    texts, embeddings = paired_image_condition(cfg, clip, tmp_path / "paired", Job(progress=False))
    items = read_images(world.dataset, split="train")
    assert texts == [ref for it in items for ref in it.references]
    own = clip.encode_images([load_image(it.path) for it in items for _ in it.references])
    torch.testing.assert_close(embeddings, own, rtol=1e-5, atol=1e-5)
    assert train_capdec(cfg, progress=False).global_step == 3

    with pytest.raises(PairfreeError, match="condition must be text or image"):
        build_config(CapDecConfig, None, [*args, "condition=images"])  # before anything runs


def test_clip_reads_the_edited_text_while_the_store_keeps_the_caption(tiny_clip_dir, tmp_path):
    """CgT-GAN encodes captions without their final period; CapDec's gender rebalancing edits
    only what CLIP reads. Either way the store's texts (the targets) are the captions."""
    from pairfree.data.training_corpus import CorpusConfig
    from pairfree.encoding import encode_corpus
    from pairfree.training.rewards import without_final_period

    captions = ["A man rides a horse.", "A dog sits ."]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(captions) + "\n")
    clip, job = load_clip(f"hf:{tiny_clip_dir}"), Job(progress=False)

    gan = encode_corpus(
        clip, CorpusConfig(path=str(path)), tmp_path / "gan", job, clip_text=without_final_period
    )
    assert gan.texts == captions
    expected = clip.encode_texts(["A man rides a horse", "A dog sits"])
    torch.testing.assert_close(gan.tensor(), expected)

    flipped = CorpusConfig(path=str(path), gender="both", gender_p=1.0)
    capdec = encode_corpus(clip, flipped, tmp_path / "capdec", job)
    assert capdec.texts == captions
    expected = clip.encode_texts(["A woman rides a horse.", "A dog sits ."])
    torch.testing.assert_close(capdec.tensor(), expected)
    plain = encode_corpus(clip, CorpusConfig(path=str(path)), tmp_path / "plain", job)
    assert not torch.allclose(plain.tensor()[0], capdec.tensor()[0])


def test_weight_decay_spares_biases_and_layer_norm_weights():
    """CgT-GAN's AdamW groups (the default): names containing "bias" or "LayerNorm.weight" get
    none. SaCap's and ICSD's code decay every parameter: their recipes say so with []."""
    from pairfree.recipes.icsd import ICSDConfig
    from pairfree.recipes.sacap import SaCapConfig
    from pairfree.training.trainer import TrainConfig, parameter_groups

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dense = torch.nn.Linear(4, 4)
            self.LayerNorm = torch.nn.LayerNorm(4)
            self.ln_f = torch.nn.LayerNorm(4)  # GPT-2's name for a norm: decayed, as there

    block = Block()
    groups = parameter_groups(list(block.named_parameters()), 0.05, TrainConfig().no_decay)
    names = {id(p): n for n, p in block.named_parameters()}
    decayed = sorted(names[id(p)] for p in groups[0]["params"])
    spared = sorted(names[id(p)] for p in groups[1]["params"])
    assert groups[0]["weight_decay"] == 0.05 and groups[1]["weight_decay"] == 0.0
    assert decayed == ["dense.weight", "ln_f.weight"]
    assert spared == ["LayerNorm.bias", "LayerNorm.weight", "dense.bias", "ln_f.bias"]
    for recipe in (SaCapConfig(), ICSDConfig()):
        groups = parameter_groups(list(block.named_parameters()), 0.05, recipe.train.no_decay)
        assert len(groups) == 1 and len(groups[0]["params"]) == 6


def test_a_prefix_of_the_model_learns_at_its_own_rate_and_follows_the_schedule():
    """ICSD's world runs fine-tune the pretrained image tower gently under a decoder that
    learns from scratch: the tower's parameters form groups of their own learning rate."""
    from pairfree.training.trainer import lr_lambda, parameter_groups

    model = torch.nn.ModuleDict({"vision": torch.nn.Linear(3, 3), "lm": torch.nn.Linear(3, 3)})
    named = list(model.named_parameters())
    groups = parameter_groups(named, 0.05, ["bias"], {"vision.": 1e-5})
    names = {id(p): n for n, p in named}
    by_name = {tuple(sorted(names[id(p)] for p in g["params"])): g for g in groups}
    assert by_name[("lm.weight",)]["weight_decay"] == 0.05 and "lr" not in by_name[("lm.weight",)]
    assert by_name[("vision.weight",)]["lr"] == 1e-5
    assert by_name[("vision.bias",)] == {"params": [model["vision"].bias], "weight_decay": 0.0,
                                         "lr": 1e-5}  # fmt: skip
    optimizer = torch.optim.AdamW(groups, lr=2e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(0, 10, "cosine"))
    for _ in range(5):
        optimizer.step()
        schedule.step()
    lrs = {
        tuple(sorted(names[id(p)] for p in g["params"])): g["lr"] for g in optimizer.param_groups
    }
    assert lrs[("vision.weight",)] == pytest.approx(0.5e-5) and lrs[
        ("lm.weight",)
    ] == pytest.approx(1e-3)


@pytest.mark.parametrize(("warmup", "warned"), [(10, True), (3, False)])
def test_a_warm_up_as_long_as_the_run_is_warned_about(tmp_path, caplog, warmup, warned):
    from torch.utils.data import TensorDataset

    from pairfree.training.trainer import OptimizerSpec, TrainConfig, Trainer

    model = torch.nn.Linear(2, 1)
    config = TrainConfig(output_dir=str(tmp_path), max_steps=10, batch_size=2,
                         warmup_steps=warmup, cpu=True)  # fmt: skip
    with caplog.at_level("WARNING", logger="pairfree.training.trainer"):
        Trainer(config, {"model": model}, [OptimizerSpec("model")],
                TensorDataset(torch.zeros(4, 2)), lambda ctx, batch: {}, lambda m, p: None,
                progress=False)  # fmt: skip
    assert ("warm-up of 10 steps >= the run's 10 steps" in caplog.text) is warned


@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_decay_as_named(schedule):
    import math

    from pairfree.training.trainer import lr_lambda

    f = lr_lambda(10, 110, schedule)
    assert [f(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]  # linear warm-up to the peak
    after = [f(10 + k) for k in range(0, 101, 25)]  # the decay's 0, 1/4, 1/2, 3/4, end
    expected = {
        "linear": [1.0, 0.75, 0.5, 0.25, 0.0],
        "cosine": [0.5 * (1 + math.cos(math.pi * k / 100)) for k in range(0, 101, 25)],
        "constant": [1.0] * 5,
    }[schedule]
    assert after == pytest.approx(expected, abs=1e-12)


def test_noam_schedule_is_xmodalers_with_lr_its_peak():
    """NoamLR: factor * d^-0.5 * min(s^-0.5, s * w^-1.5), s = step + 1; its peak (s = w) is
    train.lr."""
    from pairfree.training.trainer import TrainConfig, lr_lambda

    d, w = 512, 100
    peak = (d * w) ** -0.5
    f = lr_lambda(w, 10_000, "noam")
    for step in (0, 1, 49, 98, 99, 100, 399, 9_999):
        s = step + 1
        assert peak * f(step) == pytest.approx(d**-0.5 * min(s**-0.5, s * w**-1.5), rel=1e-12)
    with pytest.raises(ValueError, match="grad_clip_mode"):
        TrainConfig(grad_clip_mode="max")


def test_training_is_watchable_log_lines_tensorboard_and_quiet(
    corpus, tiny_clip_dir, tiny_gpt2_dir, tmp_path, capsys
):
    """Log lines every log_every steps (loss, lr, steps/s, time left) and after validation,
    with --no-progress too; TensorBoard scalars through accelerate's tracker; -q silences the
    lines, -v keeps them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pairfree.cli import main

    out = tmp_path / "run"
    args = overrides(corpus, tiny_clip_dir, tiny_gpt2_dir, out, **{
        "train.max_steps": 4, "train.log_every": 2, "corpus.val_fraction": 0.2,
        "train.report_to": "[tensorboard]"})  # fmt: skip
    assert main(["train", "capdec", "--no-progress", *args]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    steps = [line for line in lines if "validation" not in line]
    assert steps[0].startswith("step 2/4 (50%) | loss ") and "| lr " in steps[0]
    assert "steps/s" in steps[0] and steps[0].endswith("left") and len(steps) == 2
    assert any(line.startswith("step 4/4 validation | val_loss ") for line in lines)
    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [2, 4]
    assert "val_loss" in events.Tags()["scalars"]

    # run.json records how and how long it ran; `pairfree report` draws it
    sessions = json.loads((out / "run.json").read_text())["sessions"]
    assert sessions[0]["command"] and sessions[0]["to_step"] == 4  # (here: pytest's argv)
    assert sessions[0]["wall_s"] > 0 and "torch" in sessions[0]["versions"]
    assert main(["report", str(out), "--out", str(tmp_path / "report.html")]) == 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 1 and "val_loss" in page and "Glossary" in page
    assert "transformers" in page and ">seed</th><td>0<" in page
    assert main(["report", str(out), str(out) + "/", "--out", str(tmp_path / "twice.html")]) == 0
    assert (tmp_path / "twice.html").read_text().count("<svg") == 1  # one run, named twice

    assert main(["train", "capdec", "-q", *args, "train.output_dir=" + str(tmp_path / "q")]) == 0
    assert "step " not in capsys.readouterr().err
    assert main(["-v", "train", "capdec", "--no-progress", *args,
                 "train.output_dir=" + str(tmp_path / "v")]) == 0  # fmt: skip
    assert "step 2/4 (50%)" in capsys.readouterr().err


def test_the_batch_is_given_globally_or_per_device_and_never_both():
    """``batch_size`` is the global batch of an optimizer step; ``per_device_batch_size`` one
    process' forward pass, so global = per device x processes x accumulation. A config layer
    (file, command line) that gives one clears the other; one that gives both is refused."""
    from pairfree.training.trainer import TrainConfig, global_batch

    per_device = TrainConfig(batch_size=None, per_device_batch_size=4, grad_accum=3)
    assert [global_batch(per_device, n) for n in (1, 2, 8)] == [12, 24, 96]
    assert global_batch(TrainConfig(batch_size=24, grad_accum=3), 2) == 24
    with pytest.raises(PairfreeError, match="batch_size 10 .* grad_accum 1 x 4 processes"):
        global_batch(TrainConfig(batch_size=10), 4)
    with pytest.raises(ValueError, match="not both"):
        TrainConfig(batch_size=8, per_device_batch_size=4)
    with pytest.raises(ValueError, match="neither"):
        TrainConfig(batch_size=None)

    cfg = build_config(
        CapDecConfig, {"train": {"batch_size": 64}}, ["train.per_device_batch_size=16"]
    )
    assert (cfg.train.batch_size, cfg.train.per_device_batch_size) == (None, 16)
    cfg = build_config(
        CapDecConfig, {"train": {"per_device_batch_size": 16}}, ["train.batch_size=8"]
    )
    assert (cfg.train.batch_size, cfg.train.per_device_batch_size) == (8, None)
    with pytest.raises(PairfreeError, match="say the same thing two ways"):
        build_config(CapDecConfig, None, ["train.batch_size=8", "train.per_device_batch_size=4"])
    with pytest.raises(PairfreeError, match="init.train.batch_size"):
        from pairfree.recipes.cgtgan import CgtGanConfig

        build_config(CgtGanConfig, {"init": {"train": {"batch_size": 8,
                                                       "per_device_batch_size": 4}}})  # fmt: skip


def tiny_trainer(tmp_path, step, evaluate=None, **config):
    """A Linear model over 12 examples whose artifact is its weights."""
    from safetensors.torch import save_model
    from torch.utils.data import TensorDataset

    from pairfree.training.trainer import OptimizerSpec, TrainConfig, Trainer

    def save(modules, path):
        path.mkdir(parents=True)
        save_model(modules["model"], str(path / "model.safetensors"))

    torch.manual_seed(0)
    config = TrainConfig(output_dir=str(tmp_path), warmup_steps=0, lr=0.1, cpu=True, **config)
    data = TensorDataset(torch.randn(12, 2), torch.randn(12, 1))
    return Trainer(config, {"model": torch.nn.Linear(2, 1)}, [OptimizerSpec("model")], data, step,
                   save, evaluate=evaluate, progress=False)  # fmt: skip


def mse_step(seen: list[int]):
    def step(ctx, batch):
        x, y = batch
        seen.append(len(x))
        loss = torch.nn.functional.mse_loss(ctx.modules["model"](x), y)
        ctx.optimize("model", loss)
        return {"loss": loss.detach()}

    return step


def test_a_per_device_batch_is_what_one_process_reads_and_the_global_batch_is_recorded(tmp_path):
    seen: list[int] = []
    trainer = tiny_trainer(tmp_path, mse_step(seen), batch_size=None, per_device_batch_size=3,
                           grad_accum=2, max_steps=2)  # fmt: skip
    assert trainer.global_batch == 6
    assert trainer.fit().global_step == 2 and seen == [3, 3, 3, 3]
    session = json.loads((tmp_path / "run.json").read_text())["sessions"][0]
    assert (session["processes"], session["global_batch"]) == (1, 6)


def test_every_epoch_is_kept_and_the_best_is_the_epoch_of_the_best_score(tmp_path):
    """keep_epochs writes each finished epoch's artifact; the best is the epoch whose
    evaluation scored highest (select_mode max), not the last or the lowest loss."""
    scores = iter([1.0, 5.0, 3.0])
    trainer = tiny_trainer(tmp_path, mse_step([]), lambda ctx: {"val_CIDEr": next(scores)},
                           batch_size=4, epochs=3, keep_epochs=True, select_metric="val_CIDEr",
                           select_mode="max")  # fmt: skip
    result = trainer.fit()
    assert result.best_metric == 5.0 and result.global_step == 9
    kept = sorted(p.name for p in tmp_path.glob("epoch-*"))
    assert kept == ["epoch-001", "epoch-002", "epoch-003"]
    weights = {name: (tmp_path / name / "model.safetensors").read_bytes() for name in kept}
    assert len(set(weights.values())) == 3  # the model changed between epochs
    assert (tmp_path / "best" / "model.safetensors").read_bytes() == weights["epoch-002"]
    assert (tmp_path / "last" / "model.safetensors").read_bytes() == weights["epoch-003"]
    # keeping epochs or not does not change the run: a resume may switch it
    again = tiny_trainer(tmp_path, mse_step([]), batch_size=4, epochs=3, keep_epochs=False,
                         select_metric="val_CIDEr", select_mode="max")  # fmt: skip
    assert again.fit().global_step == 9
