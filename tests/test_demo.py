"""The demo's pipeline at a reduced size, and the world LM and encoder it trains."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairfree.cli import main
from pairfree.demo import (
    FULL_METHODS,
    GAN_METHODS,
    NOISE_SWEEP,
    DemoConfig,
    run_demo,
)
from pairfree.training.rewards import TextDiscriminator
from pairfree.world.lm import build_world_encoder, build_world_lm


def test_world_lm_round_trips_through_from_pretrained(tmp_path):
    build_world_lm(tmp_path / "lm", n_layer=1, n_embd=16, n_head=2)
    tok = AutoTokenizer.from_pretrained(tmp_path / "lm")
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm")
    text = "there is a big red circle, left of a small blue square."
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert lm.config.vocab_size == len(tok) < 200  # a word-level vocabulary, not GPT-2's BPE


def test_demo_runs_end_to_end_at_a_reduced_size(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--steps", "30", "--corpus", "300", "--test-images", "12"]
    assert main([*args, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "| CapDec, noise 0.016 |" in printed and "| no noise |" in printed
    assert "obj P" in printed and "exact" in printed
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 12 and "no noise" in page
    assert (out / "results.json").exists()


def test_world_encoder_loads_as_a_discriminator(tmp_path):
    build_world_encoder(tmp_path / "enc")
    disc = TextDiscriminator.from_pretrained(str(tmp_path / "enc"))
    ids, mask = disc.tokenize(["a big red circle .", "there are two shapes : a small blue star"])
    assert disc.tokenizer.unk_token_id not in ids[mask.bool()].tolist()
    logits = disc(ids, mask)
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_full_demo_scores_every_recipe_beside_its_initialization(tmp_path):
    """--full's recipes at a toy size (one sweep point and both GANs): each gets a row, and a
    GAN row is scored from its own checkpoint (best), its init row from the text-only one."""
    methods = (NOISE_SWEEP[0], *GAN_METHODS)
    cfg = DemoConfig(
        out=str(tmp_path / "full"), steps=10, n_corpus=120, n_test=4, gan_steps=4
    ).with_images(n_train_images=8, n_val=2)
    cfg.gan_batch_size = 4
    table, report = run_demo(cfg, methods, progress=False)
    for method in methods:
        assert f"| {method.name} |" in table
    results = {r["method"]: r for r in json.loads((tmp_path / "full" / "results.json").read_text())}
    assert list(results) == [m.name for m in methods]
    for method in GAN_METHODS:
        assert (cfg.run_dir(method) / method.artifact / "model.safetensors").exists()
        assert results[method.name]["scores"]["CIDEr"] >= 0
    assert all(m in FULL_METHODS for m in methods) and report.exists()
