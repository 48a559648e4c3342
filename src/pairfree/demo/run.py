"""Train the demo's methods on a world and score them on held-out world images.

Scoring is the experiment runner's (:mod:`pairfree.experiment`: caption the test set, COCO
metrics and CLIPScore with the world CLIP) plus the world's truth metrics, which parse each
caption back into objects and compare them with the scene the image was rendered from.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch

from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import read_captions
from pairfree.demo.methods import (
    DEMO_METHODS,
    UNPAIRED_RECIPES,
    DemoConfig,
    Method,
    MethodResult,
    method_config,
)
from pairfree.demo.report import html_report, results_table
from pairfree.encoding import encode_corpus
from pairfree.errors import PairfreeError
from pairfree.experiment import TestSet, caption_test_set, score_captions, train_recipe
from pairfree.io import atomic_write_json, atomic_write_text
from pairfree.job import Job
from pairfree.logs import library_log_level, show_library_logs
from pairfree.pipeline import Captioner
from pairfree.synth.llm import LLMConfig
from pairfree.synth.stages import ImageSynthesisConfig, draw_images, rephrase
from pairfree.world import load_scenes, truth_metrics
from pairfree.world.lm import build_world_bert, build_world_encoder, build_world_lm

logger = logging.getLogger(__name__)

DEMO_METRICS = ("BLEU", "METEOR", "ROUGE_L", "CIDEr")


def train_one(cfg: DemoConfig, method: Method, progress: bool = True) -> tuple[Path, float]:
    """Train ``method``'s run from scratch; returns (run directory, seconds)."""
    start = time.time()
    config = method_config(cfg, method)
    logger.info("demo: training %s (%s, %d steps) -> %s", method.name, method.recipe,
                config.train.max_steps or 0, config.train.output_dir)  # fmt: skip
    train_recipe(method.recipe, config, resume=False, progress=progress)
    return Path(config.train.output_dir), time.time() - start


def start_worker(threads: int, log_level: int | None) -> None:
    """A spawned training process: its share of the CPU, and the parent's log lines (the
    trainer's progress lines) where the parent shows them."""
    torch.set_num_threads(threads)
    if log_level is not None:
        show_library_logs(log_level)


def train_methods(
    cfg: DemoConfig, methods: Sequence[Method], *, progress: bool = True, jobs: int = 1
) -> dict[str, tuple[Path, float]]:
    """Train every distinct run the methods need on ``cfg.preset``'s world, from scratch.

    With ``jobs > 1`` the text-only runs, which share one encoded corpus, train in that many
    processes at once (the corpus is encoded first, here, so no two processes write it); the
    others run one after another. Returns training key -> (run directory, seconds)."""
    if any(m.needs_images for m in methods) and (cfg.n_train_images < 1 or cfg.n_val < 1):
        raise PairfreeError("these methods train on world images: use DemoConfig.with_images()")
    logger.info("demo: the %r world (seed %d: %d corpus captions, %d test images) in %s",
                cfg.preset, cfg.seed, cfg.n_corpus, cfg.n_test, cfg.out)  # fmt: skip
    cfg.world()
    if not (cfg.lm_dir / "config.json").exists():
        build_world_lm(cfg.lm_dir)
    if (
        any(m.recipe in UNPAIRED_RECIPES for m in methods)
        and not (cfg.encoder_dir / "config.json").exists()
    ):
        build_world_encoder(cfg.encoder_dir)
    if any(m.recipe == "icsd" for m in methods) and not (cfg.bert_dir / "config.json").exists():
        build_world_bert(cfg.bert_dir)
    if any(m.needs_synthetic for m in methods):
        synthesize_world_data(cfg, progress=progress,
                              rephrasings=any(m.recipe == "sacap" for m in methods))  # fmt: skip
    runs = {m.training_key: m for m in methods}
    parallel = [m for m in runs.values() if m.recipe == "capdec" and not m.needs_images]
    trained: dict[str, tuple[Path, float]] = {}
    if jobs > 1 and len(parallel) > 1:
        corpus = method_config(cfg, parallel[0]).corpus
        encode_corpus(load_clip(cfg.clip), corpus, cfg.corpus_features, Job(progress=progress))
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=start_worker,
            initargs=(threads, library_log_level()),
        ) as pool:  # fmt: skip
            logger.info("demo: training %d text-only runs in %d processes", len(parallel), jobs)
            futures = {m.training_key: pool.submit(train_one, cfg, m, False) for m in parallel}
            trained = {key: future.result() for key, future in futures.items()}
    for key, method in runs.items():
        if key not in trained:
            trained[key] = train_one(cfg, method, progress)
    return trained


def synthesize_world_data(
    cfg: DemoConfig, *, progress: bool = True, rephrasings: bool = True
) -> None:
    """SaCap's data for the world's corpus, as ``pairfree synthesize`` makes it: an image of
    every caption and (``rephrasings``) of each of its three rephrasings from the world's
    text-to-image model (Stable Diffusion's mistakes included), the rephrasings from the
    world's LLM. Each step is resumable and reruns in no time once done."""
    out, job = cfg.synthetic_dir, Job(progress=progress)
    logger.info("demo: SaCap's synthetic data (an image per caption, 3 rephrasings and their "
                "images) -> %s", out)  # fmt: skip
    images = ImageSynthesisConfig(backend=f"world:{cfg.preset}", seed=cfg.seed)
    captions = read_captions(cfg.world().corpus)
    draw_images(images, captions, out / "own", job=job)
    if not rephrasings:
        return
    rephrase(LLMConfig(spec=f"world:{cfg.preset}", seed=cfg.seed), [c.text for c in captions],
             out / "rephrased", job=job)  # fmt: skip
    draw_images(images, read_captions(out / "rephrased" / "prompts.jsonl"), out / "supporting",
                job=job)  # fmt: skip


def score_world_captions(
    captions: dict[str, str], test: TestSet, scenes: dict, clip: ClipEncoder
) -> dict[str, float | None]:
    """COCO metrics, CLIPScore (world CLIP) and the world's truth metrics of ``captions``."""
    report = score_captions(captions, test, clip=clip, metrics=DEMO_METRICS, by_domain=False)
    scores = dict(report.scores["overall"])
    scores.update(truth_metrics(captions, {i: scenes[i] for i in captions}))
    return scores


def run_methods(
    cfg: DemoConfig,
    methods: Sequence[Method] = DEMO_METHODS,
    *,
    test_presets: Sequence[str] = (),
    progress: bool = True,
    jobs: int = 1,
) -> list[MethodResult]:
    """Train each method on ``cfg.preset``'s world and score it on the held-out images of each
    of ``test_presets`` (default: the training world)."""
    trained = train_methods(cfg, methods, progress=progress, jobs=jobs)
    clip = load_clip(cfg.clip)
    results = []
    for preset in test_presets or (cfg.preset,):
        world = cfg.world(preset)
        test = TestSet.load(world.dataset, split="test")
        scenes = load_scenes(world.scenes)
        for method in methods:
            run, seconds = trained[method.training_key]
            captioner = Captioner.from_pretrained(
                run / method.artifact,
                clip=clip,
                project_to=cfg.corpus_features if method.project else None,
            )
            logger.info("demo: captioning and scoring %s on %d %r test images", method.name,
                        len(test.images), preset)  # fmt: skip
            captions = caption_test_set(captioner, test)
            scores = score_world_captions(captions, test, scenes, clip)
            results.append(MethodResult(method.name, preset, scores, captions, seconds, run))
    return results


def run_demo(
    cfg: DemoConfig,
    methods: Sequence[Method] = DEMO_METHODS,
    *,
    progress: bool = True,
    jobs: int = 1,
) -> tuple[str, Path]:
    """Run the demo; returns the markdown table and the path of the HTML report."""
    results = run_methods(cfg, methods, progress=progress, jobs=jobs)
    out = Path(cfg.out)
    atomic_write_json(
        out / "results.json",
        [
            {"method": r.method, "scores": r.scores, "train_seconds": r.train_seconds}
            for r in results
        ],
    )
    report = out / "report.html"
    atomic_write_text(report, html_report(results, cfg.world()))
    return results_table(results), report
