"""SCST-GAN (the "SCSTClipCap" variant): an MMD-aligned initialization, then CgT-GAN's
adversarial self-critical training.

Our interpretation: no public code exists beyond the method's command lines (an MMD term with
a Gaussian kernel of bandwidth 0.1, weights 0.3 and 1.0; a CLIP reward weight of 0.5 ramped
over 1000 steps; lr 1e-5 with a constant schedule). What this module implements:

1. Initialization, on batches of corpus captions with CLIP text embeddings t and an equally
   large batch of unpaired image embeddings v drawn at random from the training pool::

       loss_init = lambda2 * CE(caption | t) + lambda1 * MMD(m(v), m(t))

   CE is the captioner's token cross-entropy conditioned on the caption's own text embedding
   (CgT-GAN's initialization); m(x) is the mapper's prefix [k, h] flattened and L2-normalized,
   so that the Gaussian kernel ``exp(-|x - y|^2 / (2 * 0.1^2))`` sees distances in [0, 2]
   whatever the LM's width; MMD is the biased squared estimate over the two batches;
   lambda1 = 0.3, lambda2 = 1.0. The MMD term pulls the prefixes that images produce onto
   those that texts produce, so the text-trained decoder reads images from the start.
2. Adversarial SCST exactly as in :mod:`pairfree.recipes.cgtgan` (same discriminator, rewards
   and baseline), with lambda (the CLIP reward's weight) ramped from 0 at step 0 to 0.5 at
   step 1000, lr 1e-5, constant schedule without warm-up.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState

from pairfree.captioner import PrefixCaptioner, save_captioner
from pairfree.clip import load_clip
from pairfree.errors import SkipLog
from pairfree.recipes.capdec import CaptionEmbeddingDataset, split_train_val
from pairfree.recipes.cgtgan import (
    AdversarialConfig,
    CgtGanConfig,
    InitConfig,
    condition,
    init_output_dir,
    prepare_unpaired,
    train_gan,
)
from pairfree.recipes.rewards import gaussian_mmd
from pairfree.recipes.text_data import pad_collate, tokenize_captions
from pairfree.recipes.trainer import OptimizerSpec, TrainConfig, Trainer, TrainResult


@dataclass
class MmdInitConfig(InitConfig):
    mmd_weight: float = 0.3  # lambda1
    caption_weight: float = 1.0  # lambda2
    sigma: float = 0.1  # Gaussian kernel bandwidth


@dataclass
class ScstGanConfig(CgtGanConfig):
    init: MmdInitConfig = field(default_factory=MmdInitConfig)
    gan: AdversarialConfig = field(
        default_factory=lambda: AdversarialConfig(hold_steps=0, ramp_steps=1000)
    )
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=50,
            batch_size=128,
            lr=1e-5,
            weight_decay=0.05,
            warmup_steps=0,
            schedule="constant",
            grad_clip=1.0,
            select_metric="CIDEr",
            select_mode="max",
        )
    )


def prefix_points(captioner: PrefixCaptioner, cond: torch.Tensor) -> torch.Tensor:
    """The mapper's prefixes as unit vectors [B, k * h]: the space the MMD compares."""
    return F.normalize(captioner.prefix_embeds(cond).flatten(1).float(), dim=-1)


def initialize_with_mmd(
    cfg: ScstGanConfig, *, resume: bool = True, progress: bool = True
) -> TrainResult:
    """Step 1: text-conditioned captioning plus the MMD between image and text prefixes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    init = cfg.init
    skip_log = SkipLog()
    clip = load_clip(cfg.clip, device=PartialState(cpu=init.train.cpu).device)
    data = prepare_unpaired(cfg, clip, skip_log, progress=progress)
    if skip_log:
        print(skip_log.summary())
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.lm)
    tokens = tokenize_captions(tokenizer, data.corpus.texts, max_tokens=cfg.corpus.max_tokens)
    texts, images = data.corpus.tensor(), data.images.tensor()
    train_idx, val_idx = split_train_val(len(tokens), cfg.corpus.val_fraction, init.train.seed)
    train_data = CaptionEmbeddingDataset(texts[train_idx], tokens.subset(train_idx))
    val_data = CaptionEmbeddingDataset(texts[val_idx], tokens.subset(val_idx))

    model_cfg = cfg.model
    model_cfg.embed_dim = data.corpus.dim
    torch.manual_seed(init.train.seed)  # the mapper's initialization is part of the run
    model = PrefixCaptioner(model_cfg, AutoModelForCausalLM.from_pretrained(model_cfg.lm))

    def step(ctx, batch):
        emb, ids, mask = batch
        text_cond = condition(emb, cfg.normalize)
        # an unpaired image batch from the global RNG, which resume restores exactly
        rows = torch.randint(len(images), (len(emb),))
        image_cond = condition(images[rows].to(ctx.device), cfg.normalize)
        caption_loss = ctx.modules["captioner"](text_cond, ids, mask).loss
        captioner = ctx.unwrap("captioner")
        mmd = gaussian_mmd(
            prefix_points(captioner, image_cond), prefix_points(captioner, text_cond), init.sigma
        )
        loss = init.caption_weight * caption_loss + init.mmd_weight * mmd
        ctx.optimize("captioner", loss)
        return {"loss": loss.detach(), "caption_loss": caption_loss.detach(), "mmd": mmd.detach()}

    def val_step(ctx, batch):
        emb, ids, mask = batch
        captioner = ctx.unwrap("captioner")
        cond = condition(emb, cfg.normalize)
        return {"val_loss": -captioner.sequence_log_probs(cond, ids, mask, length_normalize=True)}

    def save(modules, path: Path) -> None:
        save_captioner(
            modules["captioner"],
            tokenizer,
            path,
            extra={
                "recipe": "scst-gan-init",
                "clip": cfg.clip,
                "condition": {"normalize": cfg.normalize, "offset": None},
                "generation": asdict(cfg.generation),
            },
        )

    trainer = Trainer(
        replace(init.train, output_dir=str(init_output_dir(cfg))),
        {"captioner": model},
        [OptimizerSpec("captioner", "captioner")],
        train_data,
        step,
        save,
        collate=pad_collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0),
        val_data=val_data if len(val_data) else None,
        val_step=val_step,
        run_config={"recipe": "scst-gan-init", "config": asdict(cfg)},
        progress=progress,
    )
    return trainer.fit(resume=resume)


def train_scst_gan(
    cfg: ScstGanConfig, *, resume: bool = True, progress: bool = True
) -> TrainResult:
    """Initialize with the MMD term (or load ``init.from_checkpoint``), then train adversarially."""
    initialize = partial(initialize_with_mmd, cfg, resume=resume, progress=progress)
    return train_gan(cfg, initialize, recipe="scst-gan", resume=resume, progress=progress)
