"""The demo's pipeline at a reduced size, and the world LM and encoder it trains."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pairfree.cli import main
from pairfree.demo import (
    FULL_METHODS,
    GAN_METHODS,
    ICSD_METHODS,
    NOISE_SWEEP,
    PAIRED_UPPER_BOUND,
    PCMNET_METHODS,
    SACAP_METHODS,
    TEXT_METHODS,
    DemoConfig,
    run_demo,
)
from pairfree.demo.methods import method_config
from pairfree.training.rewards import TextDiscriminator
from pairfree.world.lm import build_world_encoder, build_world_lm


def table_rows(text: str) -> dict[str, dict[str, str]]:
    """The markdown table in ``text``: method -> column label -> cell."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def strict_json(path):
    def reject(constant):
        raise ValueError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=reject)


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
    printed = capsys.readouterr()
    rows = table_rows(printed.out)
    assert list(rows) == ["CapDec, noise 0.016", "no noise"]
    # it says what it is doing while it works
    for said in ("demo: the 'default' world", "demo: training 2 text-only runs in 2 processes",
                 "demo: captioning and scoring no noise"):  # fmt: skip
        assert said in printed.err, said
    results = strict_json(out / "results.json")
    for result in results:
        row = rows[result["method"]]
        for label, key in (("C", "CIDEr"), ("obj P", "object_precision"), ("exact", "exact_scene")):
            value = result["scores"][key]
            assert row[label] == ("n/a" if value is None else f"{value:.1f}")
        for label in ("B@4", "M", "R", "obj P", "obj R", "exact", "size", "pos"):
            assert 0 <= float(row[label]) <= 100, (label, row)
        assert float(row["train s"]) == pytest.approx(result["train_seconds"], abs=0.5)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 12 and "no noise" in page
    assert "Worst cases" in page and "true scene:" in page and "<svg" in page
    assert page.count('class="right"') + page.count('class="wrong"') == 2 * 12  # every caption
    look_at_it_in_chromium(out / "report.html", tmp_path)


def look_at_it_in_chromium(page: Path, tmp_path: Path) -> None:
    """Render the page in headless Chromium: the screenshot is not blank, and the rendered DOM
    holds its tables, charts and images."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium (scripts/setup.sh installs Debian's package)")
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1600"]
    shot = tmp_path / "report.png"
    subprocess.run([*flags, f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120, check=True)  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and (pixels < 128).mean() > 0.01  # text, tables, images: not blank
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=120, check=True).stdout  # fmt: skip
    assert dom.count("<table") >= 2 and "<svg" in dom and dom.count("<img") == 12


def test_the_sync_methods_train_with_the_recipes_reassign_option(tmp_path):
    """SynC's world rows come from the recipe option (world CLIP, its text tower as the
    sentence encoder, K 15, K_r 2, 90 % kept); every other synthetic-image row has it off."""
    cfg = DemoConfig(out=str(tmp_path), n_corpus=20, n_test=2)
    methods = (*SACAP_METHODS, *ICSD_METHODS, *PCMNET_METHODS)
    assert sum(m.reassigned for m in methods) == 3
    for method in methods:
        config = method_config(cfg, method)
        section = {"sacap": "synthetic", "icsd": "synthesis"}.get(method.recipe)
        reassign = (getattr(config, section) if section else config).reassign
        assert (reassign is not None) == method.reassigned, method.name
        if method.reassigned:
            assert (reassign.clip, reassign.sentences) == (cfg.clip, f"clip:{cfg.clip}")
            assert (reassign.candidates, reassign.back, reassign.keep) == (15, 2, 0.9)


def test_world_encoder_loads_as_a_discriminator(tmp_path):
    build_world_encoder(tmp_path / "enc")
    disc = TextDiscriminator.from_pretrained(str(tmp_path / "enc"))
    ids, mask = disc.tokenize(["a big red circle .", "there are two shapes : a small blue star"])
    assert disc.tokenizer.unk_token_id not in ids[mask.bool()].tolist()
    logits = disc(ids, mask)
    assert logits.shape == (2,) and torch.isfinite(logits).all()


def test_full_demo_scores_every_recipe_beside_its_initialization(tmp_path):
    """--full's recipes at a toy size (one sweep point, both GANs, SaCap on the world's
    synthetic data): each gets a row, and a GAN row is scored from its own checkpoint (best),
    its init row from the text-only one."""
    methods = (NOISE_SWEEP[0], *GAN_METHODS, SACAP_METHODS[0])
    cfg = DemoConfig(
        out=str(tmp_path / "full"), steps=10, n_corpus=120, n_test=4, gan_steps=4
    ).with_images(n_train_images=8, n_val=2)
    cfg.gan_batch_size = 4
    table, report = run_demo(cfg, methods, progress=False)
    for method in methods:
        assert f"| {method.name} |" in table
    results = {r["method"]: r for r in strict_json(tmp_path / "full" / "results.json")}
    assert list(results) == [m.name for m in methods]
    rows = table_rows(table)
    for method in GAN_METHODS:
        assert (cfg.run_dir(method) / method.artifact / "model.safetensors").exists()
        assert rows[method.name]["C"] == f"{results[method.name]['scores']['CIDEr']:.1f}"
    # a GAN row and its init row are scored from different checkpoints
    gan, init = (
        cfg.run_dir(GAN_METHODS[1]) / a
        for a in ("best/model.safetensors", "init/last/model.safetensors")
    )
    assert gan.read_bytes() != init.read_bytes()
    assert all(m in FULL_METHODS for m in methods) and report.exists()
    synthetic = cfg.synthetic_dir
    assert all((synthetic / d / "dataset.jsonl").is_file() for d in ("own", "supporting"))


def test_spawned_training_processes_show_the_parents_log_lines(capfd):
    """The demo trains text-only runs in spawned processes; their trainer lines reach stderr as
    the parent's do (a spawned process starts with no logging set up), and stay silent where
    the parent's are not shown."""
    import logging
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from pairfree.demo.run import start_worker
    from pairfree.logs import library_log_level, show_library_logs

    show_library_logs(logging.INFO)
    assert library_log_level() == logging.INFO
    log = logging.getLogger("pairfree.training")
    for level, shown in ((library_log_level(), True), (None, False)):
        with ProcessPoolExecutor(
            1, mp_context=get_context("spawn"), initializer=start_worker, initargs=(1, level)
        ) as pool:
            pool.submit(log.info, "step 7/9 of a spawned run").result()
        assert ("step 7/9 of a spawned run" in capfd.readouterr().err) is shown


def test_world_runs_of_the_text_only_recipes_end_captions_at_end_of_text(tmp_path):
    """World captions have no final period, and CapDec's and CgT-GAN's code stop at "." only:
    the demo's runs of those recipes must train on and stop at end-of-text, or every caption
    runs to the length limit (CIDEr ~0, as main briefly had)."""
    from pairfree.demo.methods import method_config

    cfg = DemoConfig(out=str(tmp_path / "d"), n_corpus=50, n_test=2).with_images(4, 2)
    corpus = cfg.world().corpus.read_text().splitlines()
    assert not any(line.rstrip().endswith(".") for line in corpus)
    for method in (*TEXT_METHODS, PAIRED_UPPER_BOUND, *GAN_METHODS):
        assert method_config(cfg, method).generation.stop_at_eos, method.name
