"""Training data and objective of cross-attention captioners (SaCap, ICSD).

A training example is (soft-prompt condition, what the decoder cross-attends to, hard-prompt
token ids, caption token ids). With a frozen CLIP (SaCap) the cross-attended grid features are
large, so they stay in a memory-mapped feature store and a batch reads only its rows; a
captioner with its own image tower (ICSD) reads pixels, made from the image files by the
tower's transforms (augmented in training, seeded by example and epoch).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pairfree.captioner import CheckpointCard, Conditioning, GenerationConfig, caption_log_probs
from pairfree.captioner.cross_attention import CrossAttentionCaptioner, pad_prompts
from pairfree.captioner.decoding import CaptionDecoder
from pairfree.clip import ClipEncoder
from pairfree.clip.vision import PixelSpec, augment, eval_transform, train_transform
from pairfree.data import dataset_images, load_image
from pairfree.encoding import OnlineGrids
from pairfree.errors import PairfreeError
from pairfree.evaluate import caption_metrics
from pairfree.features import FeatureStore
from pairfree.job import Job
from pairfree.training.fitting import CaptionerSetup, fit_captioner, pad_ids, token_weighted
from pairfree.training.trainer import (
    EvalFn,
    StepFn,
    TrainConfig,
    TrainResult,
    ValFn,
    captions_across_processes,
)

logger = logging.getLogger(__name__)


def caption_target(text: str) -> str:
    """A caption as SaCap trains on it: cut at its first period, which ends it."""
    return text.strip().split(".")[0].strip() + "."


@dataclass
class GridExample:
    condition: torch.Tensor  # [d] the soft prompt's input (unused without a soft prompt)
    grid_row: int  # row of the grid store
    prompt: list[int]  # hard-prompt token ids
    caption: list[int]  # caption token ids, ending with the stop token


class GridCaptionDataset(Dataset):
    """Examples over one grid feature store (or grids computed as rows are read)."""

    def __init__(self, examples: Sequence[GridExample], grids: FeatureStore | OnlineGrids) -> None:
        self.examples, self.grids = list(examples), grids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        ex = self.examples[i]
        return ex.condition, torch.from_numpy(self.grids[ex.grid_row]), ex.prompt, ex.caption

    def subset(self, indices: Sequence[int]) -> GridCaptionDataset:
        return GridCaptionDataset([self.examples[i] for i in indices], self.grids)


@dataclass
class ImageExample:
    image: Path  # the image file
    prompt: list[int]  # hard-prompt token ids
    caption: list[int]  # caption token ids, ending with the stop token


class ImageCaptionDataset(Dataset):
    """Examples read from image files into pixels for a captioner's own image tower.

    With ``min_scale`` set, each image is augmented (a random crop of ``min_scale``-1 of its
    area and a random flip) with draws seeded by (``seed``, epoch, example), so the run is the
    same on any number of processes and after a resume; without it, images are resized only.
    """

    def __init__(
        self,
        examples: Sequence[ImageExample],
        pixels: PixelSpec,
        *,
        min_scale: float | None = None,
        seed: int = 0,
    ) -> None:
        self.examples, self.pixels = list(examples), pixels
        self.min_scale, self.seed, self.epoch = min_scale, seed, 0
        self.transform = (
            eval_transform(pixels) if min_scale is None else train_transform(pixels, min_scale)
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        ex = self.examples[i]
        image = load_image(ex.image)
        if self.min_scale is None:
            pixels = self.transform(image)
        else:
            pixels = augment(
                self.transform, image, (self.seed * 1_000_003 + self.epoch) * 1_000_033 + i
            )
        return torch.zeros(0), pixels, ex.prompt, ex.caption

    def subset(self, indices: Sequence[int], *, train: bool) -> ImageCaptionDataset:
        """The examples at ``indices``, augmented (as this dataset is) only if ``train``."""
        return ImageCaptionDataset(
            [self.examples[i] for i in indices],
            self.pixels,
            min_scale=self.min_scale if train else None,
            seed=self.seed,
        )


def grid_collate(pad_id: int, max_prompt_tokens: int):
    """Stack conditions and grids, left-pad prompts, right-pad captions (masks mark tokens)."""

    def collate(batch):
        conditions, grids, prompts, captions = zip(*batch, strict=True)
        prompt_ids, prompt_mask = pad_prompts(prompts, max_tokens=max_prompt_tokens, pad_id=pad_id)
        ids, mask = pad_ids(captions, pad_id)
        return torch.stack(conditions), torch.stack(grids), prompt_ids, prompt_mask, ids, mask

    return collate


def _soft(model: CrossAttentionCaptioner, condition: torch.Tensor) -> torch.Tensor | None:
    return condition if model.soft_prompt is not None else None


def grid_caption_step(label_smoothing: float = 0.0) -> StepFn:
    """Token cross-entropy of the caption given its image's grid, soft and hard prompt
    (smoothed by ``label_smoothing``)."""

    def step(ctx, batch):
        cond, grid, prompt_ids, prompt_mask, ids, mask = batch
        model = ctx.modules["captioner"]
        loss = model(_soft(ctx.unwrap("captioner"), cond), grid, prompt_ids, prompt_mask, ids,
                     mask, label_smoothing=label_smoothing).loss  # fmt: skip
        ctx.optimize("captioner", token_weighted(ctx.accelerator, loss, mask))
        return {"loss": loss.detach()}

    return step


def grid_caption_val_step() -> ValFn:
    """Length-normalized caption negative log-likelihood, per caption."""

    def val_step(ctx, batch):
        cond, grid, prompt_ids, prompt_mask, ids, mask = batch
        model = ctx.unwrap("captioner")
        logits = model(_soft(model, cond), grid, prompt_ids, prompt_mask, ids, mask).logits
        return {"val_loss": -caption_log_probs(logits, ids, mask, length_normalize=True)}

    return val_step


@dataclass
class ValidationConfig:
    """The images with references whose caption scores pick the best checkpoint."""

    dataset: str | None = None  # a real val split (as ICSD); None: held-out synthetic images
    split: str = "val"
    image_root: str | None = None
    allow_outside_root: bool = False  # read file names leading out of image_root (links)
    max_images: int | None = None  # score only the first ones (None: all)
    batch_size: int = 32


def check_validation(v: ValidationConfig) -> None:
    """Fail before any model loads on a validation dataset that is not there."""
    if v.dataset and not Path(v.dataset).is_file():
        raise PairfreeError(f"validation.dataset: {v.dataset} does not exist")


def validation_images(v: ValidationConfig, job: Job) -> tuple[list[Path], list[list[str]]]:
    """The first ``max_images`` readable images of ``v.dataset``'s split and their references."""
    items = dataset_images(v.dataset, split=v.split, image_root=v.image_root,
                           allow_outside_root=v.allow_outside_root,
                           skip_log=job.skip_log)  # fmt: skip
    items = [it for it in items if it.path is not None][: v.max_images]
    return [it.path for it in items], [list(it.references) for it in items]


def caption_score_eval(
    clip: ClipEncoder,
    tokenizer,
    generation: GenerationConfig,
    images: Sequence[Path],
    references: Sequence[Sequence[str]],
    *,
    conditioning: Conditioning | None = None,
    batch_size: int = 32,
) -> EvalFn:
    """Validation by caption quality, as ICSD selects its checkpoint: the captions of
    ``images`` (decoded with ``generation`` under the checkpoint's ``conditioning``, sharded
    over processes) scored against their references: ``val_CIDEr``, ``val_BLEU_4`` and their
    sum ``val_CIDEr+BLEU_4`` (x100)."""
    ids = [str(i) for i in range(len(images))]
    refs = {i: list(r) for i, r in zip(ids, references, strict=True)}

    def evaluate(ctx) -> dict[str, float]:
        model = ctx.unwrap("captioner")
        captioner = CaptionDecoder(model, tokenizer, clip, conditioning=conditioning,
                              generation=generation)  # fmt: skip
        predictions = captions_across_processes(
            ctx.accelerator, ids, lambda mine: captioner(list(images[mine]), batch_size=batch_size)
        )
        model.train()
        scores = caption_metrics(predictions, refs, metrics=("BLEU", "CIDEr"))
        cider, bleu = float(scores["CIDEr"] or 0.0), float(scores["Bleu_4"] or 0.0)
        return {"val_CIDEr": cider, "val_BLEU_4": bleu, "val_CIDEr+BLEU_4": cider + bleu}

    return evaluate


def checkpoint_eval(
    v: ValidationConfig,
    held_out: tuple[Sequence[Path], Sequence[str]],
    clip: ClipEncoder,
    tokenizer,
    generation: GenerationConfig,
    *,
    conditioning: Conditioning,
    job: Job,
    recipe: str,
) -> EvalFn | None:
    """What picks the best checkpoint: CIDEr of the captions of the real val split when
    ``v.dataset`` names one, else of the held-out captions' synthetic images (``held_out``:
    the images and their captions); never the test split. None, with a warning, without
    either."""
    if v.dataset:
        images, references = validation_images(v, job)
    else:
        images = list(held_out[0])[: v.max_images]
        references = [[text] for text in held_out[1]][: v.max_images]
    if not images:
        logger.warning("%s: no validation images (set validation.dataset, or "
                       "corpus.val_fraction): no best checkpoint is chosen", recipe)  # fmt: skip
        return None
    return caption_score_eval(clip, tokenizer, generation, images, references,
                              conditioning=conditioning, batch_size=v.batch_size)  # fmt: skip


def fit_cross_attention(
    train: TrainConfig,
    setup: CaptionerSetup,
    card: CheckpointCard,
    *,
    run_config: Mapping[str, Any],
    resume: bool = True,
    progress: bool = True,
    evaluate: EvalFn | None = None,
    lr_by_prefix: Mapping[str, float] | None = None,
    label_smoothing: float = 0.0,
) -> TrainResult:
    """Train a cross-attention captioner (module "captioner", one AdamW) on grid or image
    examples; artifacts carry ``card``; ``evaluate`` adds validation metrics; ``lr_by_prefix``
    as :func:`~pairfree.training.fitting.fit_captioner`'s; ``label_smoothing`` smooths the
    training loss (ICSD's 0.1; SaCap's code has none), never the validation loss."""
    tokenizer = setup.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return fit_captioner(
        train,
        setup,
        grid_caption_step(label_smoothing),
        grid_caption_val_step(),
        card,
        run_config=run_config,
        resume=resume,
        progress=progress,
        collate=grid_collate(pad or 0, setup.model.config.max_prompt_tokens),
        evaluate=evaluate,
        lr_by_prefix=lr_by_prefix,
    )
