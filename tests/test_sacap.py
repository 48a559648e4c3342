"""SaCap: re-pairing, the recipe end to end on a tiny world through the CLI (synthesize,
train, caption), its ablations, and resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pairfree import Captioner, experiment
from pairfree.cli import main
from pairfree.errors import PairfreeError
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
    world = make_world(root / "world", n_train_images=0, n_val=4, n_test=6, n_corpus=48, seed=3)
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


def sacap_setup(root, world, lm, out, *extra):
    """The config ``sacap_args`` gives, the CLIP and tokenizer it loads, and a quiet job."""
    from transformers import AutoTokenizer

    from pairfree.clip import load_clip
    from pairfree.config import build_config
    from pairfree.job import Job
    from pairfree.recipes.sacap import SaCapConfig

    settings = [a for a in sacap_args(root, world, lm, out, *extra) if "=" in a]
    cfg = build_config(SaCapConfig, None, settings)
    return (
        cfg,
        load_clip(cfg.clip),
        AutoTokenizer.from_pretrained(cfg.model.lm),
        Job(progress=False),
    )


def test_each_example_is_made_from_its_paired_image_and_the_memory_holds_the_corpus(
    synthesized, tmp_path
):
    """Re-pairing picks the candidate closest to the caption; the example's soft-prompt input,
    hard prompt and grid are the paired image's; the projection memory holds every corpus
    caption (the original's text features), also the one whose rephrasing was rejected."""
    from pairfree.captioner import condition
    from pairfree.captioner.prompts import hard_prompt, top_phrases
    from pairfree.data import load_image
    from pairfree.features import FeatureStore
    from pairfree.recipes.sacap import sacap_data
    from pairfree.training.cross_attention import caption_target

    root, world, lm = synthesized
    rephrased = tmp_path / "rephrased"  # one caption's answer lost, as an unparsed one is
    rephrased.mkdir()
    lines = (root / "rephrased" / "rephrasings.jsonl").read_text().splitlines()
    (rephrased / "rephrasings.jsonl").write_text("\n".join(lines[1:]) + "\n")
    cfg, clip, tokenizer, job = sacap_setup(root, world, lm, tmp_path / "run",
                                            f"features={tmp_path / 'features'}",
                                            f"synthetic.rephrasings={rephrased}")  # fmt: skip
    made = sacap_data(cfg, clip, tokenizer, job)
    corpus = list(dict.fromkeys(world.corpus.read_text().splitlines()))
    memory = FeatureStore(tmp_path / "features" / "captions")
    assert sorted(memory.texts) == sorted(corpus) and len(made.texts) == len(corpus) - 1
    assert json.loads(lines[0])["caption"] not in made.texts
    assert sum(p != c[0] for p, c in zip(made.paired, made.candidates, strict=True)) > 0

    text = clip.encode_texts(made.texts, normalize=True)
    paired = [load_image(p) for p in made.paired]
    embeds = clip.encode_images(paired)
    grids = clip.encode_image_grid(paired)
    phrases = FeatureStore(made.conditioning.prompt_phrases)
    prompts = [hard_prompt(p) for p in top_phrases(embeds, phrases.tensor(), phrases.texts, 3)]
    conditions = condition(embeds, made.conditioning, training=True, memory=memory.tensor())
    for k, candidates in enumerate(made.candidates):
        cosines = clip.encode_images([load_image(c) for c in candidates], normalize=True) @ text[k]
        assert cosines[candidates.index(made.paired[k])] >= cosines.max() - 1e-6
        cond, grid, prompt_ids, caption_ids = made.data[k]
        torch.testing.assert_close(cond, conditions[k], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grid.float(), grids[k].half().float())
        assert made.prompts[k] == prompts[k] and prompts[k]
        assert prompt_ids == tokenizer(prompts[k], add_special_tokens=False)["input_ids"]
        target = tokenizer(caption_target(made.texts[k]), add_special_tokens=False)["input_ids"]
        assert caption_ids == target[: cfg.corpus.max_tokens]


def test_online_grids_give_the_stored_grids_without_writing_a_store(synthesized, tmp_path):
    """grids=online computes each paired image's grid features as training reads them: the
    examples equal the stored ones (up to the store's float16) and no grid store is written;
    a run trains with them."""
    from pairfree.recipes.sacap import sacap_data

    root, world, lm = synthesized
    stored_cfg, clip, tokenizer, job = sacap_setup(root, world, lm, tmp_path / "a",
                                                   f"features={tmp_path / 'stored'}")  # fmt: skip
    online_cfg, *_ = sacap_setup(root, world, lm, tmp_path / "b", f"features={tmp_path / 'online'}",
                                 "grids=online")  # fmt: skip
    stored, online = (
        sacap_data(stored_cfg, clip, tokenizer, job),
        sacap_data(online_cfg, clip, tokenizer, job),
    )
    assert online.paired == stored.paired and len(online.data) == len(stored.data)
    for k in range(len(stored.data)):
        torch.testing.assert_close(
            online.data[k][1], stored.data[k][1].float(), rtol=2e-3, atol=2e-3
        )
    assert list((tmp_path / "stored").glob("grid-*")) and not list(
        (tmp_path / "online").glob("grid-*")
    )
    assert (
        main(sacap_args(root, world, lm, tmp_path / "run", "grids=online", "train.max_steps=2"))
        == 0
    )
    assert (tmp_path / "run" / "last" / "model.safetensors").exists()
    with pytest.raises(PairfreeError, match="grids must be store or online"):
        sacap_setup(root, world, lm, tmp_path / "c", "grids=disk")


def test_repairing_moves_a_caption_off_an_own_image_that_shows_another_caption(
    synthesized, tmp_path
):
    """Each caption's "own" image is swapped for another caption's, its supporting images
    (drawn from its rephrasings) still show it: re-pairing must move the captions to them,
    and with ``repair=false`` every caption keeps the image it was given."""
    from pairfree.recipes.sacap import sacap_data

    root, world, lm = synthesized
    own = tmp_path / "own"
    shutil.copytree(root / "own" / "images", own / "images")  # names stay inside the folder
    lines = [json.loads(x) for x in (root / "own" / "dataset.jsonl").read_text().splitlines()]
    names = [x["image"] for x in lines]
    images = [str(own / name) for name in names]
    with open(own / "dataset.jsonl", "w") as f:
        for x, name in zip(lines, names[1:] + names[:1], strict=True):  # a rotation
            f.write(json.dumps({**x, "image": name}) + "\n")
    moved = {}
    for on in (True, False):
        cfg, clip, tokenizer, job = sacap_setup(root, world, lm, tmp_path / "run",
                                                f"synthetic.images={own}", f"repair={on}",
                                                f"features={tmp_path / 'features'}")  # fmt: skip
        made = sacap_data(cfg, clip, tokenizer, job)
        assert all(str(c[0]) in images for c in made.candidates)
        moved[on] = [p != c[0] for p, c in zip(made.paired, made.candidates, strict=True)]
    assert sum(moved[True]) >= 0.9 * len(moved[True]), sum(moved[True])
    assert not any(moved[False])


def test_reassign_gives_each_caption_the_image_sync_assigns_it(synthesized, tmp_path):
    """With ``synthetic.reassign`` each caption's own image is the one SynC assigns it, made
    in the run's ``reassigned/``: given rotated images (each caption holding another's), SynC
    hands most captions back the image drawn from them."""
    from pairfree.recipes.sacap import sacap_data

    root, world, lm = synthesized
    own = tmp_path / "own"
    shutil.copytree(root / "own" / "images", own / "images")
    lines = [json.loads(x) for x in (root / "own" / "dataset.jsonl").read_text().splitlines()]
    names = [x["image"] for x in lines]
    with open(own / "dataset.jsonl", "w") as f:
        for x, name in zip(lines, names[1:] + names[:1], strict=True):
            f.write(json.dumps({**x, "image": name}) + "\n")
    holder = {names[(j + 1) % len(lines)]: x["image_id"] for j, x in enumerate(lines)}
    drawn = {x["caption"]: holder[x["image"]] for x in lines}  # the record holding its image
    reassign = ["synthetic.reassign.clip=world:builtin",
                "synthetic.reassign.sentences=clip:world:builtin"]  # fmt: skip
    for extra in ([], reassign):  # one feature cache for both runs
        cfg, clip, tokenizer, job = sacap_setup(root, world, lm, tmp_path / "run",
                                                f"synthetic.images={own}", *extra,
                                                f"features={tmp_path / 'features'}")  # fmt: skip
        made = sacap_data(cfg, clip, tokenizer, job)
        if not extra:
            assert all(c[0].parent == own / "images" for c in made.candidates)
    every = [json.loads(x) for x in
             (tmp_path / "run" / "reassigned" / "reassignment.jsonl").read_text().splitlines()]  # fmt: skip
    assigned = {r["caption"]: r["assigned"] for r in every if r["kept"]}
    assert set(made.texts) <= set(assigned) and len(assigned) < len(every)
    assert [c[0].stem for c in made.candidates] == [assigned[t] for t in made.texts]
    assert all(c[0].parent == tmp_path / "run" / "reassigned" / "images" for c in made.candidates)
    restored = sum(assigned[t] == drawn[t] for t in made.texts)
    assert restored >= 0.8 * len(made.texts), (restored, len(made.texts))
    # and through the command, which trains on it (the stage made already, reused)
    stamp = (tmp_path / "run" / "reassigned" / "reassign.json").stat().st_mtime_ns
    assert main([*sacap_args(root, world, lm, tmp_path / "run", f"synthetic.images={own}",
                             *reassign, f"features={tmp_path / 'features'}"),
                 "train.max_steps=2"]) == 0  # fmt: skip
    assert (tmp_path / "run" / "reassigned" / "reassign.json").stat().st_mtime_ns == stamp
    saved = json.loads((tmp_path / "run" / "config.json").read_text())["synthetic"]
    assert saved["images"] == str(own) and saved["reassign"]["clip"] == "world:builtin"


def test_the_best_epoch_is_chosen_by_val_cider_and_every_epoch_is_kept(
    synthesized, tmp_path, monkeypatch
):
    """With a real validation split (never the test split) SaCap captions its images after
    every epoch, keeps every epoch's checkpoint (as the original saves them) and picks the
    best by their CIDEr (scripted here: a tiny decoder scores 0 in a few steps)."""
    from safetensors.torch import load_file

    import pairfree.training.cross_attention as cross_attention
    from pairfree.data import read_images

    scripted, scored = [10.0, 30.0, 20.0], []

    def fake_metrics(predictions, references, metrics):
        scored.append((sorted(predictions), references))
        return {"CIDEr": scripted[len(scored) - 1], "Bleu_4": 0.0}

    monkeypatch.setattr(cross_attention, "caption_metrics", fake_metrics)
    root, world, lm = synthesized
    out = tmp_path / "run"
    assert main(sacap_args(root, world, lm, out, "train.max_steps=null", "train.epochs=3",
                           f"validation.dataset={world.dataset}", "corpus.val_fraction=0")) == 0  # fmt: skip
    val = [list(it.references) for it in read_images(world.dataset, split="val")]
    assert len(scored) == 3 and len(val) == 4
    assert all(list(refs.values()) == val and len(ids) == 4 for ids, refs in scored)
    history = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["eval"]["val_CIDEr"] for h in history if "eval" in h] == scripted
    assert sorted(p.name for p in out.glob("epoch-*")) == ["epoch-001", "epoch-002", "epoch-003"]
    best = load_file(str(out / "best" / "model.safetensors"))
    for epoch in (1, 2, 3):
        kept = load_file(str(out / f"epoch-{epoch:03d}" / "model.safetensors"))
        assert all(torch.equal(kept[k], best[k]) for k in best) == (epoch == 2)


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

    # the API reads both the embedding and the grid from one image-tower pass, and captions
    # as the two passes would
    captioner = Captioner.from_pretrained(out / "last")
    pil = [Image.open(p).convert("RGB") for p in images]
    two_passes = captioner.caption_embeddings(
        captioner.clip.encode_images(pil), grid=captioner.clip.encode_image_grid(pil)
    )
    for name in ("encode_images", "encode_image_grid"):
        setattr(captioner.clip, name, lambda *a, **k: pytest.fail("a second image-tower pass"))
    assert captioner.caption(pil) == two_passes == [r["caption"] for r in results]
    test = experiment.TestSet.load(world.dataset, split="test")
    by_id = experiment.caption_test_set(
        captioner, test
    )  # the experiment runner's path: one pass too
    assert set(by_id) == set(test.images) and test.embeddings(captioner.clip).shape[0] == len(by_id)


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

    from resume_helpers import resumed_run_equals_uninterrupted

    root, world, lm = synthesized

    def run_cli(args):
        return subprocess.Popen([sys.executable, "-m", "pairfree.cli", *args],
                                env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)  # fmt: skip

    extra = ("train.max_steps=8", "train.checkpoint_every=2")
    resumed_run_equals_uninterrupted(run_cli, lambda out: sacap_args(root, world, lm, out, *extra),
                                     tmp_path, 2)  # fmt: skip


@pytest.mark.parametrize(
    "path",
    sorted(str(p) for p in (Path(__file__).parents[1] / "configs" / "sacap").glob("*.yaml")),
)
def test_paper_configs_resolve_to_the_papers_settings(path):
    from pairfree.config import read_yaml
    from pairfree.recipes import get_recipe

    data = read_yaml(path)
    assert data.pop("recipe") == "sacap"
    evaluation = data.pop("evaluation")
    cfg = get_recipe("sacap").build_config(data)
    t = cfg.train
    # the original's training.py / train_infer.sh: one GPU, batch 128, torch AdamW (weight
    # decay 0.01 on every parameter), linear decay after 1000 warm-up steps, every epoch saved
    assert (t.batch_size, t.per_device_batch_size, t.grad_accum) == (128, None, 1)
    assert (t.lr, t.epochs, t.warmup_steps, t.schedule) == (1e-5, 10, 1000, "linear")
    assert (t.weight_decay, t.no_decay, t.keep_epochs) == (0.01, [], True)
    assert cfg.corpus.val_fraction == 0.0  # every caption trains
    # the best epoch: CIDEr on a real val split, never the split the config is scored on
    assert (t.select_metric, t.select_mode, t.eval_every) == ("val_CIDEr", "max", None)
    v = cfg.validation
    assert v.dataset and v.split == "val"
    assert (v.dataset, v.split) != (evaluation["dataset"], evaluation["split"])
    assert cfg.tau == 0.01 and cfg.phrases.topk == 3
    assert cfg.model.prefix_length == 10 and cfg.model.max_prompt_tokens == 20
    assert cfg.model.soft_prompt_hidden == 2048 and cfg.model.separator == ":"
    g = cfg.generation
    assert (g.num_beams, g.max_new_tokens, g.stop) == (5, 30, ".")
    assert g.score_length == "with_prompt"  # its transformers counted the prompt
    assert not g.stop_at_eos  # "." ends a caption
    assert get_recipe("sacap").config_class().generation == g  # and so do the defaults
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
