"""Text-to-image backends: the real diffusers path on a tiny Stable Diffusion pipeline built
from configs, and the world's renderer; seeds fixed per image, not per batch."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from pairfree.errors import PairfreeError
from pairfree.synth.text_to_image import (
    DiffusionSettings,
    GeneratedImage,
    TextToImage,
    image_seed,
    is_black,
    load_text_to_image,
)

PROMPTS = ["a small red circle in the middle", "two blue squares", "a green star on the left"]


def pixels(generated: list[GeneratedImage]) -> list[np.ndarray]:
    return [np.asarray(g.image, dtype=np.int16) for g in generated]


def test_seeds_depend_on_the_run_the_prompt_and_the_variant_only():
    seeds = {image_seed(0, p, v) for p in PROMPTS for v in range(3)}
    assert len(seeds) == 9 and all(0 <= s < 2**63 for s in seeds)
    assert image_seed(0, PROMPTS[0], 1) == image_seed(0, PROMPTS[0], 1)
    assert image_seed(1, PROMPTS[0], 1) != image_seed(0, PROMPTS[0], 1)


def test_diffusers_backend_makes_one_image_per_prompt_independent_of_the_batch(tiny_sd_dir):
    backend = load_text_to_image(f"diffusers:{tiny_sd_dir}", DiffusionSettings(steps=2))
    assert isinstance(backend, TextToImage) and backend.name == f"diffusers:{tiny_sd_dir}"
    seeds = [image_seed(0, p) for p in PROMPTS]
    batch = backend.generate(PROMPTS, seeds)
    assert [g.seed for g in batch] == seeds and all(g.image.size == (32, 32) for g in batch)
    alone = [backend.generate([p], [s])[0] for p, s in zip(PROMPTS, seeds, strict=True)]
    for together, single in zip(pixels(batch), pixels(alone), strict=True):
        assert np.abs(together - single).max() <= 1  # the same image, up to rounding
    again = backend.generate(PROMPTS[:1], seeds[:1])
    assert np.array_equal(pixels(again)[0], pixels(alone[:1])[0])
    other = backend.generate(PROMPTS[:1], [seeds[0] + 1])
    assert not np.array_equal(pixels(other)[0], pixels(again)[0])


def test_diffusers_settings_reach_the_pipeline(tiny_sd_dir):
    settings = DiffusionSettings(steps=3, scheduler="DPMSolverMultistepScheduler", height=16,
                                 width=16, negative_prompt="blurry", guidance_scale=3.0)  # fmt: skip
    backend = load_text_to_image(f"diffusers:{tiny_sd_dir}", settings)
    assert type(backend.pipeline.scheduler).__name__ == "DPMSolverMultistepScheduler"
    unet_calls, encoded = [], []
    backend.pipeline.unet.register_forward_hook(lambda m, args, out: unet_calls.append(args[0]))
    backend.pipeline.text_encoder.register_forward_hook(
        lambda m, args, out: encoded.append(args[0].tolist())
    )
    (made,) = backend.generate(PROMPTS[:1], [7])
    assert made.image.size == (16, 16) and made.nsfw == is_black(made.image)
    # 3 steps, each one UNet call on the prompt and the negative prompt (guidance on)
    assert len(unet_calls) == 3 and all(len(latents) == 2 for latents in unet_calls)
    tokenize = backend.pipeline.tokenizer
    assert tokenize("blurry", padding="max_length")["input_ids"] in [e[0] for e in encoded]

    def pixels_with(**changes) -> np.ndarray:
        other = load_text_to_image(f"diffusers:{tiny_sd_dir}", replace(settings, **changes))
        return pixels(other.generate(PROMPTS[:1], [7]))[0]

    same = pixels_with()
    assert np.array_equal(same, pixels([made])[0])
    for changed in [{"guidance_scale": 6.0}, {"negative_prompt": "sharp"}, {"steps": 2}]:
        assert not np.array_equal(pixels_with(**changed), same), changed
    with pytest.raises(PairfreeError, match="unknown diffusers scheduler"):
        load_text_to_image(f"diffusers:{tiny_sd_dir}", DiffusionSettings(scheduler="Nope"))


def test_world_backend_draws_the_prompt_but_for_the_mistakes_it_reports():
    from pairfree.world import parse_caption
    from pairfree.world.synth import WorldTextToImage
    from pairfree.world.truth import is_true
    from pairfree.world.variants import world_preset

    backend = load_text_to_image("world:default")
    prompts = [p for p in PROMPTS for _ in range(10)]
    seeds = [image_seed(3, p, v) for v, p in enumerate(prompts)]
    made = backend.generate(prompts, seeds)
    renderer = WorldTextToImage(world_preset("default"))
    mistaken = 0
    for prompt, seed, generated in zip(prompts, seeds, made, strict=True):
        assert not generated.nsfw and generated.seed == seed
        drawing = renderer.draw(prompt, seed)  # the scene it drew
        assert drawing.mistakes == generated.mistakes
        assert drawing.image.tobytes() == generated.image.tobytes()
        stated = parse_caption(prompt)  # "two blue squares" names no object the world knows
        assert not stated.objects or is_true(stated, drawing.scene) == (not drawing.mistakes)
        mistaken += bool(drawing.mistakes)
    assert 0 < mistaken < len(prompts)


def test_black_images_are_flagged_and_bad_specs_refused():
    from PIL import Image

    assert is_black(Image.new("RGB", (8, 8))) and not is_black(Image.new("RGB", (8, 8), "red"))
    almost = Image.new("RGB", (8, 8))
    almost.putpixel((3, 3), (1, 0, 0))  # ICSD's test is a pixel sum of 0: this one is kept
    assert not is_black(almost)
    with pytest.raises(PairfreeError, match="unknown text-to-image spec"):
        load_text_to_image("dalle:3")
    with pytest.raises(PairfreeError, match="cannot load the text-to-image model"):
        load_text_to_image("diffusers:/no/such/model")


# --------------------------------------------------------------------------- pairfree synthesize
def synthesize(corpus, backend, out, *extra) -> list[str]:
    return ["synthesize", "images", str(corpus), "--backend", backend, "--out", str(out),
            "--no-progress", *extra]  # fmt: skip


def folder_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "images").glob("*.png"))}


def test_synthesize_world_images_into_a_dataset_encode_reads(tmp_path, capsys):
    import json

    from pairfree.cli import main
    from pairfree.data import read_images

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "syn"
    assert main(synthesize(corpus, "world:default", out, "--variants", "2", "--seed", "5")) == 0
    assert "made 6 images" in capsys.readouterr().out
    records = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == [p for p in PROMPTS for _ in range(2)]
    assert [r["seed"] for r in records] == [image_seed(5, p, v) for p in PROMPTS for v in (0, 1)]
    assert all(isinstance(r["mistakes"], list) for r in records)  # the world's backend knows
    items = read_images(out / "dataset.jsonl")
    assert len(items) == 6 and all(it.path.is_file() for it in items)
    assert [it.references for it in items] == [(p,) for p in PROMPTS for _ in range(2)]
    store = tmp_path / "features"
    assert main(["encode", "--dataset", str(out / "dataset.jsonl"), "--split", "train",
                 "--clip", "world:builtin", "--out", str(store)]) == 0  # fmt: skip
    assert "wrote 6 image features" in capsys.readouterr().out
    # --clip makes the same store in the same command
    with_features = tmp_path / "syn-features"
    assert main(synthesize(corpus, "world:default", with_features, "--variants", "2", "--seed",
                           "5", "--clip", "world:builtin")) == 0  # fmt: skip
    from pairfree.features import FeatureStore

    made, encoded = FeatureStore(with_features / "features"), FeatureStore(store)
    assert made.ids == encoded.ids and torch.equal(made.tensor(), encoded.tensor())
    # the same command again makes nothing new; other settings are refused
    before = folder_bytes(out)
    assert main(synthesize(corpus, "world:default", out, "--variants", "2", "--seed", "5")) == 0
    assert folder_bytes(out) == before
    assert main(synthesize(corpus, "world:default", out, "--variants", "2", "--seed", "6")) == 2
    assert "holds a synthesis with other" in capsys.readouterr().err


def test_the_commands_run_the_library_stages_so_each_resumes_the_others_work(tmp_path, capsys):
    """`synthesize images` and `synthesize rephrase` call the stages ICSD and the demo run:
    the stage given the command's settings finds the command's folder done and makes nothing;
    other settings are refused by name."""
    from pairfree.cli import main
    from pairfree.data import read_captions
    from pairfree.job import Job
    from pairfree.synth.llm import LLMConfig
    from pairfree.synth.stages import ImageSynthesisConfig, draw_images, rephrase

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    images, rephrased = tmp_path / "images", tmp_path / "rephrased"
    assert main(synthesize(corpus, "world:default", images, "--seed", "3", "--steps", "5",
                           "--variants", "2")) == 0  # fmt: skip
    assert main(["synthesize", "rephrase", str(corpus), "--llm", "world:default", "--out",
                 str(rephrased), "--seed", "4", "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    before = folder_bytes(images), folder_bytes(rephrased)
    job = Job(progress=False)
    config = ImageSynthesisConfig(backend="world:default", seed=3, steps=5, variants=2,
                                  keep_nsfw=True)  # fmt: skip
    prompts, summary = draw_images(config, read_captions(corpus), images, job=job)
    assert [p.text for p in prompts] == [p for p in PROMPTS for _ in range(2)]
    assert summary.made == 6
    llm = LLMConfig(spec="world:default", chat_template="never", seed=4)
    assert rephrase(llm, PROMPTS, rephrased, job=job, shard_size=512) is not None
    assert (folder_bytes(images), folder_bytes(rephrased)) == before
    with pytest.raises(PairfreeError, match="holds a synthesis with other settings"):
        draw_images(replace(config, steps=6), read_captions(corpus), images, job=job)
    with pytest.raises(PairfreeError, match="variants must be at least 1"):
        ImageSynthesisConfig(variants=0)


def test_flagged_images_stay_pairs_as_sacap_keeps_them_unless_dropped(
    tmp_path, capsys, monkeypatch
):
    """SaCap's code draws, encodes and trains on every image, the safety checker's black ones
    too, so a caption whose own image was flagged stays; --nsfw drop leaves them out, as ICSD's
    code does (and the ICSD recipe, tested in test_icsd)."""
    import json

    from PIL import Image

    import pairfree.synth.stages as stages
    import pairfree.synth.text_to_image as text_to_image
    from pairfree.cli import main
    from pairfree.data import read_images

    load = text_to_image.load_text_to_image

    class SafetyChecked:  # as Stable Diffusion's checker: a flagged image comes back black
        def __init__(self, inner):
            self.inner, self.name = inner, inner.name

        def generate(self, prompts, seeds):
            made = self.inner.generate(prompts, seeds)
            return [replace(g, image=Image.new("RGB", g.image.size), nsfw=True)
                    if "circle" in p else g for p, g in zip(prompts, made, strict=True)]  # fmt: skip

    monkeypatch.setattr(stages, "load_text_to_image",
                        lambda *args, **kwargs: SafetyChecked(load(*args, **kwargs)))  # fmt: skip
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    datasets = {}
    for choice in ("keep", "drop"):
        out = tmp_path / choice
        extra = () if choice == "keep" else ("--nsfw", "drop")
        assert main(synthesize(corpus, "world:default", out, *extra)) == 0
        where = "kept in" if choice == "keep" else "left out of"
        assert f"made 3 images (1 flagged NSFW, {where} the dataset" in capsys.readouterr().out
        manifest = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert [r["nsfw"] for r in manifest] == ["circle" in p for p in PROMPTS]
        datasets[choice] = {it.references[0]: it.path for it in read_images(out / "dataset.jsonl")}
    assert list(datasets["keep"]) == PROMPTS  # the default: every caption keeps its image
    assert is_black(Image.open(datasets["keep"][PROMPTS[0]]))
    assert list(datasets["drop"]) == PROMPTS[1:]


def test_synthesize_with_diffusers_resumes_to_the_same_images(tiny_sd_dir, tmp_path, capsys):
    import json

    from pairfree.cli import main

    long = " ".join(["a very long caption"] * 30)  # over the text encoder's 77 tokens
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join([*PROMPTS, long]) + "\n")
    args = ["--steps", "2", "--shard-size", "2", "--batch-size", "2"]
    once = tmp_path / "once"
    assert main(synthesize(corpus, f"diffusers:{tiny_sd_dir}", once, *args)) == 0
    assert "made 3 images" in capsys.readouterr().out
    records = [json.loads(x) for x in (once / "manifest.jsonl").read_text().splitlines()]
    assert records[-1]["status"].startswith("skipped: prompt of") and records[-1]["image"] is None
    assert all(r["mistakes"] is None for r in records)  # diffusers cannot tell

    resumed = tmp_path / "resumed"
    assert main(synthesize(corpus, f"diffusers:{tiny_sd_dir}", resumed, *args)) == 0
    (resumed / "shards" / "00001.jsonl").unlink()  # as if killed before the last shard ended
    (resumed / "images" / f"{records[2]['id']}.png").unlink()
    (resumed / "manifest.jsonl").unlink()
    assert main(synthesize(corpus, f"diffusers:{tiny_sd_dir}", resumed, *args)) == 0
    assert folder_bytes(resumed) == folder_bytes(once)
    assert (resumed / "manifest.jsonl").read_text() == (once / "manifest.jsonl").read_text()


def test_images_where_no_prompt_makes_a_pair_fail_naming_the_manifest(
    tiny_sd_dir, tmp_path, capsys
):
    """Every prompt too long for the text encoder: nothing to train on, so the job fails with
    the commonest reason and the file listing every prompt's status (it exited 0)."""
    from pairfree.cli import main

    long = " ".join(["a very long caption"] * 30)  # over the text encoder's 77 tokens
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(f"one {long}\ntwo {long}\n")
    out = tmp_path / "out"
    assert main(synthesize(corpus, f"diffusers:{tiny_sd_dir}", out, "--steps", "2")) == 2
    captured = capsys.readouterr()
    assert "made 0 images" in captured.out and "skipped 2 prompts" in captured.out
    assert "synthesize images kept nothing, all 2 rejected" in captured.err
    assert "(2): 'prompt of 123 tokens; the text encoder reads 77'" in captured.err
    assert str(out / "manifest.jsonl") in captured.err


@pytest.mark.slow
def test_two_processes_synthesize_what_one_does(tmp_path):
    import os
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS * 3) + "\n")
    runs = {}
    for name, launcher in (
        ("one", []),
        ("two", ["-m", "torch.distributed.run", "--nproc_per_node", "2"]),
    ):
        out = tmp_path / name
        cmd = [
            sys.executable,
            *launcher,
            "-m",
            "pairfree.cli",
            *synthesize(corpus, "world:default", out, "--shard-size", "2"),
        ]
        done = subprocess.run(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("made 9 images") == 1
        runs[name] = (folder_bytes(out), (out / "manifest.jsonl").read_text())
    assert runs["one"] == runs["two"]


# --------------------------------------------------------------------------- grouping
def test_faiss_groups_equal_the_exact_blocked_search(monkeypatch):
    from pairfree import retrieval
    from pairfree.synth.grouping import nearest_captions

    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(0))
    dense = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(x, dim=-1).T
    expected = dense.topk(30, dim=1).indices  # without ties, each row is its own best match
    assert torch.equal(expected[:, 0], torch.arange(500))
    for budget in (7 * 500, 500 * 500):  # blocks of 7 queries, and all 500 at once
        monkeypatch.setattr(retrieval, "SCORE_BUDGET", budget)
        assert torch.equal(nearest_captions(x, 30), expected)
    assert torch.equal(nearest_captions(x, 30, backend="faiss"), expected)
    # the IVF index (for millions of captions) is approximate: on clustered data, as caption
    # embeddings are, most neighbours agree
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(20, 32, generator=g).repeat(25, 1)
    clustered = centers + 0.3 * torch.randn(500, 32, generator=g)
    exact = nearest_captions(clustered, 10)
    ivf = nearest_captions(clustered, 10, backend="faiss", ivf_threshold=100, nprobe=16)
    assert torch.equal(ivf[:, 0], torch.arange(500))
    same = [len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ivf, exact, strict=True)]
    assert sum(same) / exact.numel() > 0.9
    with pytest.raises(PairfreeError, match="1 <= k <= 500"):
        nearest_captions(x, 501)


@pytest.mark.slow
def test_diffusers_synthesis_killed_and_in_two_processes_makes_the_same_images(
    tiny_sd_dir, tmp_path
):
    """SIGKILL after the first shard, rerun: the same images as an uninterrupted run; and two
    processes (torchrun) make the same images as one."""
    import os
    import signal
    import subprocess
    import sys

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{p} number {i}" for i in range(4) for p in PROMPTS) + "\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")

    def command(out, launcher=()):
        args = synthesize(corpus, f"diffusers:{tiny_sd_dir}", out, "--steps", "2",
                          "--shard-size", "2", "--batch-size", "2")  # fmt: skip
        return [sys.executable, *launcher, "-m", "pairfree.cli", *args]

    def run(out, launcher=()):
        done = subprocess.run(command(out, launcher), env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        return folder_bytes(out), (out / "manifest.jsonl").read_text()

    once = run(tmp_path / "once")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not (killed / "shards" / "00000.jsonl").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.jsonl").exists(), "killed too late to test resume"
    assert run(killed) == once
    assert run(tmp_path / "two", ["-m", "torch.distributed.run", "--nproc_per_node", "2"]) == once


def test_dedup_leaves_out_groups_holding_the_same_captions(tmp_path):
    import json

    from pairfree.synth.text import group_captions

    # three tight pairs: each caption's 2-group is {itself, its twin}, so each pair's two
    # groups hold the same captions
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g)
    x = centers.repeat_interleave(2, dim=0) + 0.01 * torch.randn(6, 16, generator=g)
    ids, texts = [f"c{i}" for i in range(6)], [f"caption {i}" for i in range(6)]
    every = group_captions(ids, texts, x, tmp_path / "all", k=2)
    assert [grp.members for grp in every][:2] == [["c0", "c1"], ["c1", "c0"]]
    kept = group_captions(ids, texts, x, tmp_path / "dedup", k=2, dedup=True)
    assert [grp.id for grp in kept] == ["c0", "c2", "c4"]
    written = (tmp_path / "dedup" / "groups.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in written] == ["c0", "c2", "c4"]


def test_a_bad_group_or_summary_line_is_named_by_file_line_and_what_is_wrong(tmp_path):
    from pairfree.errors import BadInputError, SkipLog
    from pairfree.synth.text import read_groups, read_summaries

    groups = tmp_path / "groups.jsonl"
    groups.write_text('{"id": "0", "members": ["0"], "captions": ["a"]}\n{"group": 1}\n')
    with pytest.raises(
        BadInputError, match=r"groups.jsonl:2: not a group: .*id, members, captions"
    ):
        read_groups(groups)
    summaries = tmp_path / "summaries.jsonl"
    good = '{"id": "0", "selected": ["0"], "captions": ["a"], "summary": "b"}'
    summaries.write_text(f"{good}\nnot json\n")
    log = SkipLog()
    assert [s.summary for s in read_summaries(summaries, log)] == ["b"]
    assert [(e.line, e.reason) for e in log.items] == [(2, "not a summary record: not valid JSON "
                                                           "(Expecting value)")]  # fmt: skip
    groups.write_bytes(b"\xff\n")
    with pytest.raises(BadInputError, match="groups.jsonl: not UTF-8"):
        read_groups(groups)


def test_diffusion_settings_a_pipeline_cannot_draw_are_one_line(tiny_sd_dir):
    with pytest.raises(PairfreeError, match="guidance_scale must be 0 or more, not nan"):
        DiffusionSettings(guidance_scale=float("nan"))
    odd = DiffusionSettings(steps=1, height=13, width=13)  # not a multiple of the VAE's factor
    backend = load_text_to_image(f"diffusers:{tiny_sd_dir}", odd)
    with pytest.raises(PairfreeError, match=r"^diffusers:.*divisible"):
        backend.generate(["a red circle"], [0])


# --------------------------------------------------------------------------- stale caches


def test_other_weights_behind_the_same_diffusers_name_refuse_to_resume(tiny_sd_dir, tmp_path,
                                                                      capsys):  # fmt: skip
    """Shards are keyed by a fingerprint of the pipeline's weights and scheduler, not by its
    name alone: re-saved weights or another scheduler config at the same path are refused in
    one line rather than mixed with the old images; the same pipeline resumes."""
    import json
    import shutil

    from diffusers import UNet2DConditionModel

    from pairfree.cli import main

    sd = tmp_path / "sd"
    shutil.copytree(tiny_sd_dir, sd)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "syn"
    args = synthesize(corpus, f"diffusers:{sd}", out, "--steps", "2")
    assert main(args) == 0
    assert main(args) == 0  # the same weights, loaded again: resumed (nothing new to make)
    capsys.readouterr()
    saved = json.loads((out / "synthesis.json").read_text())
    assert len(saved["fingerprint"]) == 10

    unet = UNet2DConditionModel.from_pretrained(sd / "unet")
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    unet.save_pretrained(sd / "unet")  # fine-tuned, saved where the old one was
    assert main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pairfree")]
    assert len(err) == 1 and "other fingerprint" in err[0] and "weights" in err[0], err
    assert json.loads((out / "synthesis.json").read_text()) == saved  # left as it was

    shutil.rmtree(sd / "unet")
    shutil.copytree(tiny_sd_dir / "unet", sd / "unet")
    assert main(args) == 0  # the old weights back: it resumes again
    config = sd / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps(json.loads(config.read_text()) | {"beta_end": 0.02}))
    assert main(args) == 2 and "other fingerprint" in capsys.readouterr().err


def test_a_changed_world_renderer_behind_the_same_name_refuses_to_resume(tmp_path, capsys,
                                                                        monkeypatch):  # fmt: skip
    from PIL import ImageOps

    from pairfree.cli import main
    from pairfree.world.synth import WorldTextToImage

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "syn"
    assert main(synthesize(corpus, "world:default", out)) == 0
    draw = WorldTextToImage.draw

    def inverted(self, prompt, seed=0):  # the renderer of another pairfree version
        drawing = draw(self, prompt, seed)
        return replace(drawing, image=ImageOps.invert(drawing.image.convert("RGB")))

    monkeypatch.setattr(WorldTextToImage, "draw", inverted)
    assert main(synthesize(corpus, "world:default", out)) == 2
    assert "other fingerprint" in capsys.readouterr().err


def test_grouping_a_corpus_is_reused_without_loading_its_clip_and_redone_when_asked_otherwise(
    tmp_path,
):
    """group_corpus (ICSD's stage 1, `pairfree synthesize group`): the captions encoded and
    grouped once; the same captions, CLIP and settings give the saved groups without loading
    the CLIP; other settings group again. A repeated caption is grouped with one embedding."""
    from pairfree.clip import load_clip
    from pairfree.data import Caption
    from pairfree.job import Job
    from pairfree.synth.text import group_corpus

    texts = ["a red circle", "a blue square", "a red circle", "two green stars", "a blue circle"]
    captions = [Caption(t, None, "corpus.txt", None) for t in texts]
    loads = []

    def load():
        loads.append(1)
        return load_clip("world:builtin")

    job = Job(progress=False)
    first = group_corpus(
        "world:builtin", load, captions, tmp_path / "g", tmp_path / "f", k=3, job=job
    )
    assert len(loads) == 1 and [g.id for g in first] == ["0", "1", "2", "3", "4"]
    assert first[0].captions == first[2].captions  # the repeated caption, one embedding
    again = group_corpus(
        "world:builtin", load, captions, tmp_path / "g", tmp_path / "f", k=3, job=job
    )
    assert again == first and len(loads) == 1
    other = group_corpus(
        "world:builtin", load, captions, tmp_path / "g", tmp_path / "f", k=2, job=job
    )
    assert len(loads) == 2 and all(len(g.members) == 2 for g in other)
