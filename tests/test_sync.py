"""SynC's re-assignment: the cycle score on constructed embeddings, the sentence encoders,
`pairfree synthesize reassign` end to end on a tiny world (deterministic, resumable, read by a
recipe as any synthetic dataset) and the recipes' ``reassign`` option (the same stage)."""

import json
import shutil
import subprocess
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from synthetic_helpers import synthesize_world

from pairfree.errors import PairfreeError
from pairfree.synth.reassign import ReassignConfig, cycle_scores, reassign

E = torch.eye(6)


def test_a_consistent_pair_is_kept_and_an_inconsistent_one_is_reassigned_or_dropped():
    # captions A, B, D and their images a, b, d, plus an extra image e. Image b is misdrawn:
    # it looks like caption A, so it retrieves A back; e shows B; d shows nothing any caption
    # says, and D's text is nearest to d alone
    text = torch.stack([E[0], E[1], E[3]])  # A, B, D
    images = torch.stack([E[0], 0.9 * E[0] + 0.6 * E[1], E[3] + 2 * E[5], E[1] + 0.1 * E[0]])
    sentences = torch.stack([E[0], E[1], E[2]])  # three captions that say different things
    assigned, scores = cycle_scores(text, images, sentences, candidates=2, back=1)
    # A: its own image a retrieves A back (score 1); B: b retrieves A (0), e retrieves B (1);
    # D: d retrieves D back (1) too, but keep its own: both are consistent
    assert assigned.tolist() == [0, 3, 2] and scores.tolist() == pytest.approx([1, 1, 1])
    # D's image now shows A's content: nothing retrieves D back, so D scores lowest and goes
    images[2] = E[0] + 0.2 * E[3]
    result = reassign(text, images, sentences, ReassignConfig(candidates=2, back=1, keep=0.67))
    assert result.kept == [0, 1] and result.assigned[1] == 3 and result.scores[2] < 0.5


def test_ties_go_to_the_candidate_the_text_to_image_search_ranked_first():
    text = E[:1]
    images = torch.stack([E[0] + 0.1 * E[1], E[0] + 0.3 * E[1], E[2]])
    sentences = E[:1]  # one caption: every candidate retrieves it back (score 1)
    assigned, scores = cycle_scores(text, images, sentences, candidates=3, back=1)
    assert assigned.tolist() == [0] and scores.tolist() == pytest.approx([1.0])


def test_the_scores_are_chunk_independent_and_the_config_is_checked():
    torch.manual_seed(0)
    text, images = torch.randn(50, 8), torch.randn(40, 8)
    sentences = F.normalize(torch.randn(50, 5), dim=-1)
    whole = cycle_scores(text, images, sentences, candidates=7, back=3)
    chunked = cycle_scores(text, images, sentences, candidates=7, back=3, chunk=9)
    assert torch.equal(whole[0], chunked[0]) and torch.allclose(whole[1], chunked[1])
    for bad in ({"keep": 0}, {"keep": 1.5}, {"candidates": 0}, {"index": "annoy"},
                {"sentences": "sbert"}, {"sentences": "hf:"}):  # fmt: skip
        with pytest.raises(PairfreeError):
            ReassignConfig(**bad)


def test_the_hf_sentence_encoder_mean_pools_its_tokens(tmp_path):
    from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel

    from pairfree.synth.sentences import load_sentence_encoder
    from pairfree.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    folder = tmp_path / "tiny-bert"
    config = BertConfig(vocab_size=49408, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)  # fmt: skip
    BertModel(config).save_pretrained(folder)
    clip_tokenizer().save_pretrained(folder)  # any real tokenizer will do
    encoder = load_sentence_encoder(f"hf:{folder}")
    texts = ["a red dog", "two cats sleeping on a long sofa"]
    got = encoder.encode(texts, batch_size=1)
    model, tokenizer = AutoModel.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        for text, row in zip(texts, got, strict=True):
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
            assert torch.allclose(row, F.normalize(hidden.mean(0), dim=-1), atol=1e-5)
    with pytest.raises(PairfreeError, match="does not exist"):
        load_sentence_encoder(f"hf:{tmp_path / 'none'}")
    with pytest.raises(PairfreeError, match="unknown sentence encoder"):
        load_sentence_encoder("sbert")


@pytest.fixture(scope="module")
def synthesized(tmp_path_factory):
    return synthesize_world(tmp_path_factory.mktemp("sync"), n_corpus=40, n_test=2, n_val=2, seed=5)


def reassign_cli(capsys, source, out, *extra) -> subprocess.CompletedProcess:
    """`pairfree synthesize reassign` (in this process, as a subprocess would run it)."""
    from pairfree.cli import main

    argv = ["synthesize", "reassign", str(source), "--out", str(out), "--clip", "world:builtin",
            "--sentences", "clip:world:builtin", "--no-progress", *extra]  # fmt: skip
    try:
        code = main(argv)
    except SystemExit as refused:  # argparse's refusals
        code = refused.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, code, captured.out, captured.err)


def test_reassign_writes_a_dataset_the_recipes_read_deterministically(
    synthesized, tmp_path, capsys
):
    from pairfree.data import CleaningConfig, read_images
    from pairfree.job import Job
    from pairfree.synth.images import synthetic_images

    root, world = synthesized
    done = reassign_cli(capsys, root / "own", tmp_path / "sync", "--keep", "0.75")
    assert done.returncode == 0, done.stderr
    assert "40 captions" in done.stdout and "30 kept" in done.stdout
    summary = json.loads((tmp_path / "sync" / "reassign.json").read_text())
    every = [
        json.loads(x)
        for x in (tmp_path / "sync" / "reassignment.jsonl").read_text().split("\n")
        if x
    ]
    assert len(every) == 40 and sum(r["kept"] for r in every) == 30 == summary["kept"]
    kept_scores = sorted(r["score"] for r in every if r["kept"])
    assert min(kept_scores) >= max(r["score"] for r in every if not r["kept"])
    assert summary["reassigned"] == sum(r["assigned"] != r["own"] for r in every)
    # a synthetic dataset of its own: one record per kept pair, its image inside the folder
    items = read_images(tmp_path / "sync" / "dataset.jsonl")
    assert len(items) == 30 and all(it.path.is_file() for it in items)
    by_caption = {r["caption"]: r["assigned"] for r in every if r["kept"]}
    assert all(it.path.stem == by_caption[it.references[0]] for it in items)
    images = synthetic_images(
        str(tmp_path / "sync"), "images", CleaningConfig(), Job(progress=False)
    )
    assert len(images) == 30  # every kept caption, also those sharing an image

    # the same inputs give the same files; a second run reuses the cached encodings
    again = reassign_cli(capsys, root / "own", tmp_path / "sync-again", "--keep", "0.75")
    assert again.returncode == 0, again.stderr
    for name in ("dataset.jsonl", "reassignment.jsonl"):
        assert (tmp_path / "sync" / name).read_text() == (
            tmp_path / "sync-again" / name
        ).read_text()
    (tmp_path / "sync" / "dataset.jsonl").unlink()  # as if stopped before the end

    def encodings():  # the arrays written, not the manifests
        found = (tmp_path / "sync" / "features").rglob("*")
        return {p: p.stat().st_mtime_ns for p in found if p.suffix in (".npy", ".safetensors")}

    cached = encodings()
    resumed = reassign_cli(capsys, root / "own", tmp_path / "sync", "--keep", "0.75")
    assert resumed.returncode == 0, resumed.stderr
    assert len(cached) == 3 and encodings() == cached  # nothing encoded again
    assert (tmp_path / "sync" / "dataset.jsonl").read_text() == (
        tmp_path / "sync-again" / "dataset.jsonl").read_text()  # fmt: skip


def pcmnet_cli(world, images, out, features, *extra) -> int:
    from pairfree.cli import main

    return main(["train", "pcmnet", f"corpus.path={world.corpus}", "clip=world:builtin",
                 f"images={images}", f"concepts.vocabulary={world.entities}",
                 "min_word_count=1", "model.width=16", "model.heads=2", "model.ffn=32",
                 "train.max_steps=2", "train.batch_size=4", f"features={features}",
                 f"train.output_dir={out}", "--no-progress", *extra])  # fmt: skip


def test_a_recipe_trains_on_the_reassigned_dataset(synthesized, tmp_path, caplog, capsys):
    """PCM-Net trains on the step's folder (one feature cache with a run on the original
    images), and its ``reassign:`` option makes the same dataset in the run and trains exactly
    as ``images=`` that folder does; CapDec on image embeddings reads it as a paired corpus."""
    from safetensors.torch import load_file

    from pairfree.cli import main

    root, world = synthesized
    assert reassign_cli(capsys, root / "own", tmp_path / "sync").returncode == 0
    option = ["reassign.clip=world:builtin", "reassign.sentences=clip:world:builtin"]
    for images, out, extra in ((root / "own", "run-own", []), (tmp_path / "sync", "run", []),
                               (root / "own", "opt", option)):  # fmt: skip
        assert pcmnet_cli(world, images, tmp_path / out, tmp_path / "f", *extra) == 0
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["images"] == str(tmp_path / "sync") and meta["reassign"] is None
    made = tmp_path / "opt" / "reassigned"
    assert (made / "dataset.jsonl").read_text() == (tmp_path / "sync" / "dataset.jsonl").read_text()
    trained = [
        load_file(str(tmp_path / run / "last" / "model.safetensors")) for run in ("run", "opt")
    ]
    assert trained[0].keys() == trained[1].keys()
    for name, weights in trained[0].items():
        torch.testing.assert_close(weights, trained[1][name], rtol=0, atol=0)
    saved = json.loads((tmp_path / "opt" / "config.json").read_text())
    assert saved["images"] == str(root / "own") and saved["reassign"]["keep"] == 0.9

    # a captioner on image embeddings reads the re-assigned pairs as a paired corpus
    from pairfree.world.lm import build_world_lm

    lm = build_world_lm(tmp_path / "lm", n_layer=1, n_embd=16, n_head=2)
    assert main(["train", "capdec", f"corpus.path={tmp_path / 'sync' / 'dataset.jsonl'}",
                 "condition=image", "clip=world:builtin", f"model.lm={lm}", "train.max_steps=2",
                 "train.batch_size=4", "train.warmup_steps=1", "corpus.val_fraction=0",
                 f"train.output_dir={tmp_path / 'capdec'}", "--no-progress"]) == 0  # fmt: skip
    kept = sum(json.loads(x)["kept"] for x in
               (tmp_path / "sync" / "reassignment.jsonl").read_text().splitlines())  # fmt: skip
    assert kept == 36 and "of 36 training captions" in caplog.text  # every kept pair trains


def test_bad_inputs_name_what_is_wrong(synthesized, tmp_path, capsys):
    root, _ = synthesized
    done = reassign_cli(capsys, tmp_path, tmp_path / "out")
    assert done.returncode != 0 and "dataset.jsonl" in done.stderr
    done = reassign_cli(capsys, root / "own", tmp_path / "out2", "--keep", "2")
    assert done.returncode != 0 and "share" in done.stderr
    done = reassign_cli(capsys, root / "own", tmp_path / "out3", "--sentences", "sbert")
    assert done.returncode != 0 and "unknown sentence encoder" in done.stderr


def test_the_stage_is_made_again_only_when_its_source_or_settings_change(synthesized, tmp_path):
    from pairfree.job import Job
    from pairfree.synth.reassign import training_images

    root, _ = synthesized
    cfg = ReassignConfig(clip="world:builtin", sentences="clip:world:builtin")
    job, out = Job(progress=False), tmp_path / "sync"
    assert training_images(str(root / "own"), None, out, job=job) == str(root / "own")
    assert not out.exists()  # no option, no stage

    def made(source, settings) -> dict:
        assert training_images(str(source), settings, out, job=job) == str(out)
        return json.loads((out / "reassign.json").read_text())

    first = made(root / "own", cfg)
    written = (out / "reassign.json").stat().st_mtime_ns
    assert (
        made(root / "own", cfg) == first and (out / "reassign.json").stat().st_mtime_ns == written
    )
    assert made(root / "own", replace(cfg, keep=0.5))["kept"] == 20  # other settings
    copy = shutil.copytree(root / "own", tmp_path / "copy")
    lines = (copy / "dataset.jsonl").read_text().splitlines(keepends=True)
    (copy / "dataset.jsonl").write_text("".join(lines[:30]))  # another dataset
    assert made(copy, cfg)["captions"] == 30
    # its images, not the first source's under the same names; no earlier image is left over
    listed = [json.loads(x)["image"] for x in (out / "dataset.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(
        {name.split("/")[-1] for name in listed}
    )
    for name in listed:
        assert (out / name).samefile(copy / "images" / (out / name).name)
