"""Train and evaluate the world CLIP.

Scenes are drawn on the fly from one or more world presets (held-out words included: like a
web-scale CLIP, the world CLIP has seen every object the captioners are tested on), rendered
and captioned. The loss is CLIP's symmetric InfoNCE with a learnable temperature, plus
attribute-swap hard negatives on the image-to-text side: the positive caption rewritten for
the scene with two objects' colors, shapes or sizes exchanged, so that word order, not just
the bag of words, decides the match (DESIGN.md section 5, lesson 2); and shape-substitution
negatives (one object's shape replaced), because color and position are easy for a small CNN
and shape is not: without them the image tower learned shapes far worse than colors.

A share of the training images (``synthetic_fraction``) is drawn in the world's synthetic
style, as illustrations and renders are a minority of the web images real CLIP learned from:
real CLIP reads Stable Diffusion images about as well as photos, with a moderate, systematic
style shift between the two, and so must the world CLIP for the synthetic-image recipes to
be tested in a world like ours.

Evaluation uses a fixed held-out set, reproducible from (worlds, size, seed): retrieval
recall in both directions, the modality gap, the attribute-swap and shape-substitution
accuracies, and how the same scenes read in the synthetic style.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pairfree.world.clip import WorldClip, WorldClipConfig, build_vocabulary, save_world_clip
from pairfree.world.language import caption_scene, parse_caption
from pairfree.world.render import render_scene
from pairfree.world.scene import Scene
from pairfree.world.truth import is_true
from pairfree.world.variants import WorldConfig, world_preset

logger = logging.getLogger(__name__)

EVAL_SEED = 20_240_401
_SWAPPABLE = ("color", "shape", "size")


def resolve_worlds(worlds: str | Sequence[str]) -> list[WorldConfig]:
    names = [worlds] if isinstance(worlds, str) else list(worlds)
    if not names:
        raise ValueError("at least one world preset is needed")
    return [world_preset(name) for name in names]


def world_vocabulary(worlds: Sequence[WorldConfig], *, scenes: int = 2000) -> list[str]:
    """Every word the worlds' captions use, read from a fixed sample of their captions."""
    rng = np.random.default_rng([EVAL_SEED, 2])
    captions = [
        caption_scene(world.sample_scene(rng, include_held_out=True), rng, world.phrasing)
        for world in worlds
        for _ in range(scenes)
    ]
    return build_vocabulary(captions)


def swap_attributes(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """``scene`` with one attribute exchanged between two objects, or None when no exchange
    yields a different valid scene (one object, or every exchange collides)."""
    n = len(scene.objects)
    options = [(i, j, a) for i in range(n) for j in range(i + 1, n) for a in _SWAPPABLE]
    for k in rng.permutation(len(options)):
        i, j, attribute = options[int(k)]
        a, b = scene.objects[i], scene.objects[j]
        if getattr(a, attribute) == getattr(b, attribute):
            continue
        objects = list(scene.objects)
        objects[i] = replace(a, **{attribute: getattr(b, attribute)})
        objects[j] = replace(b, **{attribute: getattr(a, attribute)})
        try:
            return replace(scene, objects=tuple(objects))
        except ValueError:  # the exchange made two objects share a (shape, color) pair
            continue
    return None


def substitute_shape(scene: Scene, world: WorldConfig, rng: np.random.Generator) -> Scene:
    """``scene`` with one object's shape replaced by another of the world's shapes."""
    i = int(rng.integers(len(scene.objects)))
    shapes = [s for s in world.shapes if s != scene.objects[i].shape]
    for k in rng.permutation(len(shapes)):
        objects = list(scene.objects)
        objects[i] = replace(objects[i], shape=shapes[int(k)])
        try:
            return replace(scene, objects=tuple(objects))
        except ValueError:  # the new shape collides with another object's (shape, color)
            continue
    return scene


def caption_pair(
    scene: Scene, world: WorldConfig, rng: np.random.Generator
) -> tuple[str, str | None, str | None]:
    """A true caption of ``scene``, its attribute-swapped hard negative and its
    shape-substituted hard negative (each None when there is none).

    All three captions are written from the same random stream, so they share template,
    order and synonyms and differ only in the changed words; a negative that is still true of
    the scene (e.g. a size swap the caption does not state) is dropped.
    """
    caption_seed = int(rng.integers(2**63))

    def write(s: Scene) -> str:
        return caption_scene(s, np.random.default_rng(caption_seed), world.phrasing)

    def negative(changed: Scene | None) -> str | None:
        if changed is None:
            return None
        text = write(changed)
        return (
            None if text == caption or is_true(parse_caption(text), scene, complete=False) else text
        )

    caption = write(scene)
    swapped = negative(swap_attributes(scene, rng))
    return caption, swapped, negative(substitute_shape(scene, world, rng))


@dataclass
class WorldSample:
    """Rendered scenes with one caption and at most one hard negative each."""

    scenes: list[Scene]
    images: list[Image.Image]
    captions: list[str]
    negatives: list[str | None]  # attribute swapped between two objects
    shape_negatives: list[str | None]  # one object's shape replaced
    synthetic_images: list[Image.Image] = field(default_factory=list)  # same scenes, other style


def sample_world(
    worlds: Sequence[WorldConfig],
    rng: np.random.Generator,
    n: int,
    *,
    image_size: int,
    synthetic_fraction: float = 0.0,
) -> WorldSample:
    """``n`` captioned scenes; each image is in its world's synthetic style with probability
    ``synthetic_fraction``, else in its real style."""
    sample = WorldSample([], [], [], [], [])
    for _ in range(n):
        world = worlds[int(rng.integers(len(worlds)))]
        scene = world.sample_scene(rng, include_held_out=True)
        caption, negative, shape_negative = caption_pair(scene, world, rng)
        synthetic = synthetic_fraction > 0 and rng.random() < synthetic_fraction
        style = world.synthetic if synthetic else world.render
        sample.scenes.append(scene)
        sample.images.append(render_scene(scene, rng, size=image_size, style=style))
        sample.captions.append(caption)
        sample.negatives.append(negative)
        sample.shape_negatives.append(shape_negative)
    return sample


def held_out_set(
    worlds: str | Sequence[str], *, n: int = 500, image_size: int = 64, seed: int = EVAL_SEED
) -> WorldSample:
    """The fixed evaluation set: the same (worlds, n, image_size, seed) give the same set.

    Every scene is also drawn in the synthetic style (of the first world; the presets share
    it), from a stream of its own, so the real-style set is what it was before."""
    configs = resolve_worlds(worlds)
    data = sample_world(configs, np.random.default_rng([seed, 1]), n, image_size=image_size)
    rng = np.random.default_rng([seed, 3])
    data.synthetic_images = [
        render_scene(scene, rng, size=image_size, style=configs[0].synthetic)
        for scene in data.scenes
    ]
    return data


def _recall(sims: torch.Tensor, relevant: torch.Tensor, k: int) -> float:
    top = sims.topk(min(k, sims.shape[1]), dim=1).indices
    return relevant.gather(1, top).any(dim=1).float().mean().item()


@torch.no_grad()
def _preference(
    model: WorldClip,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    negatives: Sequence[str | None],
) -> tuple[float | None, int]:
    """How often an image prefers its caption over the caption's hard negative."""
    with_negative = [i for i, neg in enumerate(negatives) if neg is not None]
    if not with_negative:
        return None, 0
    neg_emb = model.encode_text(*model.tokenize([negatives[i] for i in with_negative])).float()
    chosen = image_emb[with_negative]
    wins = (chosen * text_emb[with_negative]).sum(-1) > (chosen * neg_emb).sum(-1)
    return wins.float().mean().item(), len(with_negative)


def _centered_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine of paired rows once each set's centroid is removed: the per-sample
    agreement that is left beyond the sets' mean offset."""
    return F.cosine_similarity(a - a.mean(0), b - b.mean(0), dim=-1).mean().item()


@torch.no_grad()
def _encode_images(
    model: WorldClip, images: Sequence[Image.Image], batch_size: int
) -> torch.Tensor:
    chunks = [
        model.encode_image(model.pixels(images[start : start + batch_size]))
        for start in range(0, len(images), batch_size)
    ]
    return torch.cat(chunks).float()


def style_metrics(
    model: WorldClip,
    real: torch.Tensor,
    text: torch.Tensor,
    synthetic_images: Sequence[Image.Image],
    relevant: torch.Tensor,
    *,
    batch_size: int = 256,
) -> dict:
    """How the synthetic style of the same scenes reads: synthetic image -> caption R@1, the
    distance between the real and synthetic image centroids (to compare with the image-text
    gap) and the centered cosine of a scene's real and synthetic image."""
    synthetic = _encode_images(model, synthetic_images, batch_size)
    return {
        "synthetic_i2t_r1": _recall(synthetic @ text.T, relevant, 1),
        "real_synthetic_distance": (real.mean(0) - synthetic.mean(0)).norm().item(),
        "real_synthetic_centered_cosine": _centered_cosine(real, synthetic),
    }


@torch.no_grad()
def evaluate_world_clip(model: WorldClip, data: WorldSample, *, batch_size: int = 256) -> dict:
    """Retrieval R@1/R@5 both ways (a hit is any item of the same scene), the modality gap
    ``|mean image emb - mean text emb|``, the per-sample agreement left once the centroids
    are removed (mean cosine of centered image and caption embeddings), how often images
    prefer their caption over its attribute-swapped and shape-substituted versions, and
    (when the set has them) :func:`style_metrics` of its synthetic-style images."""
    model.eval()
    image_emb = _encode_images(model, data.images, batch_size)
    text_emb = torch.cat(
        [
            model.encode_text(*model.tokenize(data.captions[start : start + batch_size]))
            for start in range(0, len(data.captions), batch_size)
        ]
    ).float()
    ids = {scene: i for i, scene in enumerate(dict.fromkeys(data.scenes))}
    scene_ids = torch.tensor([ids[s] for s in data.scenes])
    relevant = scene_ids[:, None] == scene_ids[None, :]
    sims = image_emb @ text_emb.T
    swap_accuracy, swap_pairs = _preference(model, image_emb, text_emb, data.negatives)
    shape_accuracy, _ = _preference(model, image_emb, text_emb, data.shape_negatives)
    styles = {}
    if data.synthetic_images:
        styles = style_metrics(
            model, image_emb, text_emb, data.synthetic_images, relevant, batch_size=batch_size
        )
    return styles | {
        "i2t_r1": _recall(sims, relevant, 1),
        "i2t_r5": _recall(sims, relevant, 5),
        "t2i_r1": _recall(sims.T, relevant, 1),
        "t2i_r5": _recall(sims.T, relevant, 5),
        "gap": (image_emb.mean(0) - text_emb.mean(0)).norm().item(),
        "centered_pair_cosine": _centered_cosine(image_emb, text_emb),
        "swap_accuracy": swap_accuracy,
        "swap_pairs": swap_pairs,
        "shape_accuracy": shape_accuracy,
        "n_eval": len(data.images),
    }


def clip_loss(model: WorldClip, batch: WorldSample, *, hard_negatives: bool) -> torch.Tensor:
    """Symmetric InfoNCE; image-to-text also ranks the batch's hard-negative captions."""
    image_emb = model.encode_image(model.pixels(batch.images))
    negatives = []
    if hard_negatives:
        negatives = [n for n in batch.negatives + batch.shape_negatives if n is not None]
    text_emb = model.encode_text(*model.tokenize(batch.captions + negatives))
    scale = model.scale()
    targets = torch.arange(len(batch.images), device=image_emb.device)
    image_to_text = scale * image_emb @ text_emb.T
    text_to_image = scale * text_emb[: len(batch.images)] @ image_emb.T
    return (F.cross_entropy(image_to_text, targets) + F.cross_entropy(text_to_image, targets)) / 2


def _optimizer(model: WorldClip, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; biases, norm gains and the temperature are not decayed."""
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=lr,
    )


def train_world_clip(
    config: WorldClipConfig,
    world_preset: str | Sequence[str] = "default",
    *,
    steps: int = 600,
    batch_size: int = 128,
    seed: int = 0,
    out_dir: str | Path | None = None,
    hard_negatives: bool = True,
    synthetic_fraction: float = 0.0,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: float = 0.05,
    n_eval: int = 500,
    log_every: int = 50,
) -> dict:
    """Train a world CLIP, evaluate it on the held-out set and (with ``out_dir``) save it.

    Returns the metrics, which the checkpoint's ``config.json`` records together with what
    is needed to rebuild the held-out set.
    """
    if steps < 1 or batch_size < 2:
        raise ValueError(f"need steps >= 1 and batch_size >= 2, got {steps} and {batch_size}")
    if not 0.0 <= synthetic_fraction < 1.0:
        raise ValueError(f"synthetic_fraction must be in [0, 1), got {synthetic_fraction}")
    worlds = resolve_worlds(world_preset)
    if not config.vocabulary:
        config = replace(config, vocabulary=world_vocabulary(worlds))
    torch.manual_seed(seed)
    model = WorldClip(config)
    optimizer = _optimizer(model, lr, weight_decay)
    warmup_steps = max(1, int(warmup * steps))

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return 0.5 * (
            1.0 + math.cos(math.pi * (step - warmup_steps) / max(1, steps - warmup_steps))
        )

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    rng = np.random.default_rng([seed, 0])
    start = time.perf_counter()
    loss = torch.tensor(float("nan"))
    model.train()
    for step in range(steps):
        batch = sample_world(
            worlds,
            rng,
            batch_size,
            image_size=config.image_size,
            synthetic_fraction=synthetic_fraction,
        )
        loss = clip_loss(model, batch, hard_negatives=hard_negatives)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (step + 1) % log_every == 0:
            logger.info(
                "world clip step %d/%d loss %.4f scale %.1f",
                step + 1,
                steps,
                loss.item(),
                model.scale().item(),
            )
    seconds = time.perf_counter() - start
    names = [w.name for w in worlds]
    held_out = held_out_set(names, n=n_eval, image_size=config.image_size)
    metrics = evaluate_world_clip(model, held_out)
    metrics |= {
        "eval_worlds": names,
        "eval_seed": EVAL_SEED,
        "steps": steps,
        "batch_size": batch_size,
        "seed": seed,
        "hard_negatives": hard_negatives,
        "synthetic_fraction": synthetic_fraction,
        "final_loss": loss.item(),
        "logit_scale": model.scale().item(),
        "train_seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if out_dir is not None:
        save_world_clip(model, out_dir, metrics=metrics)
    return metrics
