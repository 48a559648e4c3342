"""The shapes-world demo: from nothing to a results table on a laptop CPU in minutes.

It makes a world, encodes its caption corpus with the shipped world CLIP, trains CapDec on
text only (noise variance 0.016) and the no-noise baseline, captions held-out images, and
scores the captions with the COCO metrics, CLIPScore and the world's truth metrics. The same
functions drive ``bench/world.py``.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path

import torch

from pairfree.clip import ClipEncoder, load_clip
from pairfree.config import build_config
from pairfree.data import load_image, read_images
from pairfree.encoding import encode_captions
from pairfree.errors import PairfreeError, SkipLog
from pairfree.evaluate import evaluate
from pairfree.io import atomic_write_json, atomic_write_text
from pairfree.pipeline import Captioner
from pairfree.recipes.capdec import CapDecConfig, prepare_corpus, train_capdec
from pairfree.recipes.cgtgan import CgtGanConfig, train_cgtgan
from pairfree.recipes.scst_gan import ScstGanConfig, train_scst_gan
from pairfree.world import WorldPaths, load_scenes, make_world, truth_metrics
from pairfree.world.lm import build_world_encoder, build_world_lm

WORLD_CLIP = "world:builtin"
COCO_COLUMNS = (("Bleu_4", "B@4"), ("METEOR", "M"), ("ROUGE_L", "R"), ("CIDEr", "C"))
CLIP_COLUMNS = (("CLIPScore", "CLIP-S"),)
GAN_TRAINERS = {"cgtgan": train_cgtgan, "scst-gan": train_scst_gan}
TRUTH_COLUMNS = (
    ("object_precision", "obj P"),
    ("object_recall", "obj R"),
    ("exact_scene", "exact"),
    ("size_accuracy", "size"),
    ("position_accuracy", "pos"),
    ("relation_accuracy", "rel"),
)


@dataclass
class Method:
    """A named way of training a captioner and of running it.

    ``recipe`` trains it (capdec, cgtgan or scst-gan) with config ``overrides``; ``artifact``
    is the checkpoint of the run that is scored (a GAN's ``best``, or its text-only
    ``init/last`` to compare against); ``project`` adds DeCap projection onto the training
    corpus at inference."""

    name: str
    overrides: dict[str, object] = field(default_factory=dict)
    project: bool = False
    recipe: str = "capdec"
    artifact: str = "last"

    @property
    def needs_images(self) -> bool:
        """Trained on world images (the GANs' unpaired ones, the upper bound's paired ones)."""
        return self.recipe != "capdec" or self.overrides.get("condition") == "image"

    @property
    def training_key(self) -> str:
        """Methods that differ only at inference share one trained run."""
        options = ",".join(f"{k}={v}" for k, v in sorted(self.overrides.items()))
        return f"{self.recipe}:{options}"


DEMO_METHODS = (
    Method("CapDec, noise 0.016", {"noise.variance": 0.016}),
    Method("no noise", {"noise.variance": 0.0}),
)
NOISE_SWEEP = tuple(
    Method(f"CapDec, noise {v}", {"noise.variance": v}) for v in (0.001, 0.004, 0.064)
)
GAN_METHODS = (
    Method("CgT-GAN: its text-only init", recipe="cgtgan", artifact="init/last"),
    Method("CgT-GAN", recipe="cgtgan", artifact="best"),
    Method("SCST-GAN: its MMD init", recipe="scst-gan", artifact="init/last"),
    Method("SCST-GAN", recipe="scst-gan", artifact="best"),
)
PAIRED_UPPER_BOUND = Method(
    "paired upper bound (ClipCap)", {"condition": "image", "noise.variance": 0.0}
)
FULL_METHODS = (*DEMO_METHODS, *NOISE_SWEEP, PAIRED_UPPER_BOUND, *GAN_METHODS)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    preset: str = "default"
    seed: int = 0
    n_corpus: int = 6000
    n_test: int = 200
    steps: int = 700
    batch_size: int = 64
    lr: float = 2e-3
    clip: str = WORLD_CLIP
    beams: int = 3
    # the unpaired recipes also need images without captions (and a few with, to validate)
    n_train_images: int = 0
    n_val: int = 0
    gan_steps: int = 150
    gan_batch_size: int = 32
    gan_lr: float = 2e-5

    def with_images(self, n_train_images: int = 1500, n_val: int = 100) -> DemoConfig:
        return replace(self, n_train_images=n_train_images, n_val=n_val)


@dataclass
class MethodResult:
    method: str
    scores: dict[str, float | None]
    captions: dict[str, str]
    train_seconds: float


def world_for(cfg: DemoConfig, preset: str | None = None) -> WorldPaths:
    preset = preset or cfg.preset
    counts = (cfg.n_train_images, cfg.n_val, cfg.n_test, cfg.n_corpus)
    return make_world(
        Path(cfg.out) / f"world-{preset}-{cfg.seed}-{'-'.join(map(str, counts))}",
        preset=preset,
        n_train_images=cfg.n_train_images,
        n_val=cfg.n_val,
        n_test=cfg.n_test,
        n_corpus=cfg.n_corpus,
        seed=cfg.seed,
    )


def features_dir(cfg: DemoConfig) -> Path:
    return Path(cfg.out) / "features" / f"{cfg.preset}-{cfg.seed}-{cfg.n_corpus}-corpus"


def run_dir(cfg: DemoConfig, method: Method) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in method.training_key)
    return Path(cfg.out) / "runs" / f"{slug}-{cfg.preset}-{cfg.seed}"


def capdec_config(cfg: DemoConfig, world: WorldPaths, lm_dir: Path, method: Method) -> CapDecConfig:
    """CapDec at world scale: an mlp mapper and a 2-layer word-level GPT-2. The paired upper
    bound (``condition=image``) trains the same way on the world's captioned train images."""
    paired = method.overrides.get("condition") == "image"
    corpus = world.dataset if paired else world.corpus
    features = (
        features_dir(cfg).with_name(f"{cfg.preset}-{cfg.seed}-paired")
        if paired
        else features_dir(cfg)
    )
    base = {
        "clip": cfg.clip,
        "features": str(features),
        "corpus": {"path": str(corpus), "val_fraction": 0.02, "max_tokens": 48},
        "model": {"lm": str(lm_dir), "mapper": "mlp", "prefix_length": 10},
        "train": {
            "output_dir": str(run_dir(cfg, method)),
            "max_steps": cfg.steps,
            "batch_size": cfg.batch_size,
            "lr": cfg.lr,
            "warmup_steps": cfg.steps // 10,
            "checkpoint_every": cfg.steps,
            "log_every": 50,
            "eval_every": cfg.steps,
            "seed": cfg.seed,
        },
        "generation": {"num_beams": cfg.beams, "max_new_tokens": 48, "stop": None},
    }
    overrides = [f"{k}={v}" for k, v in method.overrides.items()]
    return build_config(CapDecConfig, base, overrides)


def gan_config(
    cfg: DemoConfig, world: WorldPaths, lm_dir: Path, encoder_dir: Path, method: Method
) -> CgtGanConfig:
    """CgT-GAN / SCST-GAN at world scale: the demo's text-only training as the initialization,
    an untrained 2-layer world RoBERTa as the discriminator (trained at 1e-3), the paper's
    reward schedule shortened to the run (lambda held at 0 for a sixth of it, then ramped
    over half of it), the best checkpoint by validation CIDEr."""
    base = {
        "clip": cfg.clip,
        "features": str(Path(cfg.out) / "features" / f"{cfg.preset}-{cfg.seed}-unpaired"),
        "corpus": {"path": str(world.corpus), "val_fraction": 0.02, "max_tokens": 48},
        "images": {"path": str(world.dataset), "split": "train"},
        "val": {"dataset": str(world.dataset), "split": "val"},
        "model": {"lm": str(lm_dir), "mapper": "mlp", "prefix_length": 10},
        "init": {
            "train": {
                "max_steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "warmup_steps": cfg.steps // 10,
                "seed": cfg.seed,
                "log_every": 50,
            }
        },
        "gan": {
            "discriminator": str(encoder_dir),
            # untrained, unlike roberta-base: at the generator's 2e-5 it would barely learn
            "discriminator_lr": 1e-3,
            "hold_steps": cfg.gan_steps // 6,
            "ramp_steps": cfg.gan_steps // 2,
        },
        "train": {
            "output_dir": str(run_dir(cfg, method)),
            "max_steps": cfg.gan_steps,
            "batch_size": cfg.gan_batch_size,
            "lr": cfg.gan_lr,
            "warmup_steps": 10,
            "eval_every": cfg.gan_steps // 4,
            "checkpoint_every": cfg.gan_steps // 4,
            "log_every": 20,
            "seed": cfg.seed,
        },
        "generation": {"num_beams": 1, "max_new_tokens": 48, "stop": None},
    }
    config_class = ScstGanConfig if method.recipe == "scst-gan" else CgtGanConfig
    overrides = [f"{k}={v}" for k, v in method.overrides.items()]
    return build_config(config_class, base, overrides)


@dataclass
class TestSet:
    """The held-out images of a world, with what scoring needs."""

    images: dict
    references: dict[str, list[str]]
    scenes: dict
    domains: dict[str, str]

    @classmethod
    def load(cls, world: WorldPaths) -> TestSet:
        items = read_images(world.dataset, split="test")
        return cls(
            images={it.image_id: load_image(it.path) for it in items},
            references={it.image_id: list(it.references) for it in items},
            scenes=load_scenes(world.scenes),
            domains={it.image_id: it.domain for it in items if it.domain},
        )


def score(captions: Mapping[str, str], test: TestSet, clip: ClipEncoder) -> dict[str, float | None]:
    """COCO metrics, CLIPScore (world CLIP) and the world's truth metrics of ``captions``."""
    predictions = [{"image_id": i, "caption": c} for i, c in captions.items()]
    report = evaluate(
        predictions,
        test.references,
        clip=clip,
        images=test.images,
        metrics=("BLEU", "METEOR", "ROUGE_L", "CIDEr"),
    )
    scores = dict(report.scores["overall"])
    scores.update(truth_metrics(captions, {i: test.scenes[i] for i in captions}))
    return scores


def train_config(cfg: DemoConfig, method: Method) -> CapDecConfig | CgtGanConfig:
    """The recipe config of ``method``'s run on ``cfg``'s world."""
    world = world_for(cfg)
    lm_dir = Path(cfg.out) / "world-lm"
    if method.recipe == "capdec":
        return capdec_config(cfg, world, lm_dir, method)
    if method.recipe in GAN_TRAINERS:
        return gan_config(cfg, world, lm_dir, Path(cfg.out) / "world-encoder", method)
    raise PairfreeError(f"unknown recipe {method.recipe!r} for {method.name!r}")


def train_one(cfg: DemoConfig, method: Method, progress: bool = True) -> tuple[Path, float]:
    """Train ``method``'s run from scratch; returns (run directory, seconds)."""
    start = time.time()
    config = train_config(cfg, method)
    trainer = train_capdec if method.recipe == "capdec" else GAN_TRAINERS[method.recipe]
    trainer(config, resume=False, progress=progress)
    return Path(config.train.output_dir), time.time() - start


def train_methods(
    cfg: DemoConfig, methods: Sequence[Method], *, progress: bool = True, jobs: int = 1
) -> dict[str, tuple[Path, float]]:
    """Train every distinct run the methods need on ``cfg.preset``'s world, from scratch.

    With ``jobs > 1`` the text-only runs, which share one encoded corpus, train in that many
    processes at once (the corpus is encoded first, here, so no two processes write it); the
    others run one after another. Returns training key -> (run directory, seconds)."""
    if any(m.needs_images for m in methods) and (cfg.n_train_images < 1 or cfg.n_val < 1):
        raise PairfreeError("these methods train on world images: use DemoConfig.with_images()")
    world_for(cfg)
    lm_dir, encoder_dir = Path(cfg.out) / "world-lm", Path(cfg.out) / "world-encoder"
    if not (lm_dir / "config.json").exists():
        build_world_lm(lm_dir)
    gans = any(m.recipe != "capdec" for m in methods)
    if gans and not (encoder_dir / "config.json").exists():
        build_world_encoder(encoder_dir)
    runs = {m.training_key: m for m in methods}
    parallel = [m for m in runs.values() if m.recipe == "capdec" and not m.needs_images]
    trained: dict[str, tuple[Path, float]] = {}
    if jobs > 1 and len(parallel) > 1:
        config = train_config(cfg, parallel[0])
        corpus = prepare_corpus(config, SkipLog())
        encode_captions(load_clip(cfg.clip), corpus, features_dir(cfg), progress=progress)
        threads = max(1, (os.cpu_count() or 1) // jobs)
        with ProcessPoolExecutor(
            jobs, mp_context=get_context("spawn"), initializer=torch.set_num_threads,
            initargs=(threads,),
        ) as pool:  # fmt: skip
            futures = {m.training_key: pool.submit(train_one, cfg, m, False) for m in parallel}
            trained = {key: future.result() for key, future in futures.items()}
    for key, method in runs.items():
        if key not in trained:
            trained[key] = train_one(cfg, method, progress)
    return trained


def caption_test_set(
    cfg: DemoConfig,
    method: Method,
    run: Path,
    test: TestSet,
    clip: ClipEncoder,
    image_embeds,
) -> dict[str, str]:
    """The method's captions of the test images (whose embeddings are given), by id."""
    project_to = features_dir(cfg) if method.project else None
    captioner = Captioner.from_pretrained(run / method.artifact, clip=clip, project_to=project_to)
    texts = captioner.caption_embeddings(image_embeds)
    return dict(zip(test.images, texts, strict=True))


def run_methods(
    cfg: DemoConfig,
    methods: Sequence[Method] = DEMO_METHODS,
    *,
    progress: bool = True,
    jobs: int = 1,
) -> tuple[list[MethodResult], WorldPaths]:
    """Train each method on one world and score it on that world's held-out test images."""
    trained = train_methods(cfg, methods, progress=progress, jobs=jobs)
    world = world_for(cfg)
    clip = load_clip(cfg.clip)
    test = TestSet.load(world)
    image_embeds = clip.encode_images(list(test.images.values()))
    results = []
    for method in methods:
        run, seconds = trained[method.training_key]
        captions = caption_test_set(cfg, method, run, test, clip, image_embeds)
        results.append(MethodResult(method.name, score(captions, test, clip), captions, seconds))
    return results, world


def _cell(value: float | None) -> str:
    return "n/a" if value is None or value != value else f"{value:.1f}"


def results_table(results: Sequence[MethodResult]) -> str:
    """A markdown table: one row per method, COCO metrics, CLIPScore, truth metrics."""
    columns = COCO_COLUMNS + CLIP_COLUMNS + TRUTH_COLUMNS
    lines = [
        "| method | " + " | ".join(label for _, label in columns) + " | train s |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for r in results:
        cells = " | ".join(_cell(r.scores.get(key)) for key, _ in columns)
        lines.append(f"| {r.method} | {cells} | {r.train_seconds:.0f} |")
    return "\n".join(lines)


def html_report(results: Sequence[MethodResult], world: WorldPaths, *, examples: int = 12) -> str:
    """A self-contained HTML page: the metrics table and example images with captions."""
    items = read_images(world.dataset, split="test")[:examples]
    columns = COCO_COLUMNS + CLIP_COLUMNS + TRUTH_COLUMNS
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label in columns)
    rows = "".join(
        f"<tr><td>{html.escape(r.method)}</td>"
        + "".join(f"<td>{_cell(r.scores.get(k))}</td>" for k, _ in columns)
        + "</tr>"
        for r in results
    )
    cards = []
    for it in items:
        buf = io.BytesIO()
        load_image(it.path).save(buf, format="PNG")
        src = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
        generated = "".join(
            f"<li><b>{html.escape(r.method)}</b>: {html.escape(r.captions.get(it.image_id, ''))}</li>"
            for r in results
        )
        refs = "".join(f"<li>{html.escape(t)}</li>" for t in it.references)
        cards.append(
            f'<div class="card"><img src="{src}" alt="{html.escape(it.image_id)}">'
            f"<ul>{generated}</ul><details><summary>references</summary><ul>{refs}</ul>"
            "</details></div>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>pairfree demo</title><style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
td {{ text-align: right; }} td:first-child {{ text-align: left; }}
.grid {{ display: flex; flex-wrap: wrap; gap: 1em; }}
.card {{ width: 300px; }} .card img {{ width: 192px; image-rendering: pixelated; }}
</style></head><body>
<h1>pairfree demo: text-only captioning in the shapes world</h1>
<p>Captioners trained on captions only (no images), evaluated on held-out images. COCO metrics
and CLIPScore x100; truth metrics are percentages from parsing each caption back into
objects.</p>
<table><tr><th>method</th>{head}</tr>{rows}</table>
<h2>Examples</h2><div class="grid">{"".join(cards)}</div>
</body></html>
"""


def run_demo(
    cfg: DemoConfig,
    methods: Sequence[Method] = DEMO_METHODS,
    *,
    progress: bool = True,
    jobs: int = 1,
) -> tuple[str, Path]:
    """Run the demo; returns the markdown table and the path of the HTML report."""
    results, world = run_methods(cfg, methods, progress=progress, jobs=jobs)
    out = Path(cfg.out)
    atomic_write_json(
        out / "results.json",
        [
            {"method": r.method, "scores": r.scores, "train_seconds": r.train_seconds}
            for r in results
        ],
    )
    report = out / "report.html"
    atomic_write_text(report, html_report(results, world))
    return results_table(results), report
