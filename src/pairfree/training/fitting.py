"""Fitting a captioner, whatever it reads: caption tokens and their datasets, the
train/validation split, the token-weighted loss under DDP, the checkpoint writer, and the
one-module training run every recipe's captioner goes through."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pairfree.captioner import CheckpointCard, GenerationConfig, save_captioner
from pairfree.errors import PairfreeError
from pairfree.training.trainer import (
    EvalFn,
    OptimizerSpec,
    SaveFn,
    StepFn,
    TrainConfig,
    Trainer,
    TrainResult,
    ValFn,
)

logger = logging.getLogger(__name__)


@dataclass
class CaptionTokens:
    """Token ids per caption (ending with the LM's end-of-text token where it is trained)."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[i]

    def subset(self, indices: Sequence[int]) -> CaptionTokens:
        return CaptionTokens([self.ids[i] for i in indices])


def tokenize_captions(
    tokenizer, texts: Sequence[str], *, max_tokens: int = 40, end_of_text: bool
) -> CaptionTokens:
    """Tokenize once up front (fast tokenizers batch this) and truncate to ``max_tokens``;
    with ``end_of_text`` the last of them is the LM's end-of-text token, a target too, so that
    the captioner learns to stop there (CapDec's and CgT-GAN's code train on the caption's
    tokens only: their captions end where decoding reaches ".")."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if not end_of_text:
        return CaptionTokens([ids[:max_tokens] for ids in encoded])
    if tokenizer.eos_token_id is None:
        raise PairfreeError("the LM's tokenizer has no end-of-text token to end captions with")
    eos = tokenizer.eos_token_id
    return CaptionTokens([ids[: max_tokens - 1] + [eos] for ids in encoded])


def warn_if_captions_never_stop(texts: Sequence[str], generation: GenerationConfig) -> None:
    """Warn where most training captions do not end with the text decoding stops at and
    end-of-text is not trained (the originals' way): such a captioner never learns to stop,
    and every caption it writes runs to ``max_new_tokens`` (a corpus without final periods,
    as the world's, decodes to CIDEr near 0)."""
    if generation.stop_at_eos or not texts:
        return
    stop = generation.stop
    ending = sum(bool(stop) and t.rstrip().endswith(stop) for t in texts)
    if ending < len(texts) / 2:
        logger.warning(
            "%d of %d training captions end with the stop text %r and generation.stop_at_eos "
            "is false (the original code's way): the captioner will not learn to stop, so its "
            "captions run to max_new_tokens=%d; set generation.stop_at_eos=true to train and "
            "stop at end-of-text",
            ending,
            len(texts),
            stop,
            generation.max_new_tokens,
        )


def pad_ids(ids: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token ids into ids and a mask that marks the real tokens."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, x in enumerate(ids):
        input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[row, : len(x)] = 1
    return input_ids, mask


def pad_collate(pad_id: int | None) -> Callable:
    """Stack conditions, right-pad token ids; the mask (not the pad id) marks real tokens.
    Examples with an extra item (:class:`CaptionEmbeddingDataset`'s ``extras``) add their
    list as the batch's last element."""
    pad_id = pad_id if pad_id is not None else 0

    def collate(batch):
        conditions, ids, *extras = zip(*batch, strict=True)
        input_ids, mask = pad_ids(ids, pad_id)
        stacked = torch.stack([torch.as_tensor(c) for c in conditions])
        return (stacked, input_ids, mask, *(list(e) for e in extras))

    return collate


class CaptionEmbeddingDataset(Dataset):
    """(CLIP embedding, caption tokens) pairs, or triples with each caption's extra item
    (ViECap: its entities)."""

    def __init__(
        self, embeddings: torch.Tensor, tokens: CaptionTokens, extras: Sequence | None = None
    ) -> None:
        if len(embeddings) != len(tokens):
            raise PairfreeError(f"{len(embeddings)} embeddings but {len(tokens)} captions")
        if extras is not None and len(extras) != len(tokens):
            raise PairfreeError(f"{len(extras)} extra items for {len(tokens)} captions")
        self.embeddings, self.tokens, self.extras = embeddings, tokens, extras

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple:
        if self.extras is None:
            return self.embeddings[i], self.tokens[i]
        return self.embeddings[i], self.tokens[i], self.extras[i]


def split_train_val(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, round(n * fraction)) if fraction > 0 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class CaptionerSetup:
    """A fresh captioner, its tokenizer, and its data split into train / validation."""

    model: torch.nn.Module  # a PrefixCaptioner, or a CrossAttentionCaptioner
    tokenizer: Any
    train_data: Dataset
    val_data: Dataset


def token_weighted(accelerator, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This process' mean token loss, rescaled so that DDP's average over processes is the
    mean over every caption token of the global batch, as one process computes it (a plain
    average of per-process means would weigh a token by how full its process' batch was)."""
    if accelerator.num_processes == 1:
        return loss
    tokens = mask.sum().float()
    total = accelerator.reduce(tokens.detach().clone(), reduction="sum")
    return loss * tokens * accelerator.num_processes / total


def save_with_card(card: CheckpointCard, tokenizer, module: str = "captioner") -> SaveFn:
    """The trainer's artifact writer: module ``module`` as a captioner checkpoint with ``card``."""

    def save(modules: Mapping[str, torch.nn.Module], path: Path) -> None:
        save_captioner(modules[module], tokenizer, path, card)

    return save


def fit_captioner(
    train: TrainConfig,
    setup: CaptionerSetup,
    step: StepFn,
    val_step: ValFn,
    card: CheckpointCard,
    *,
    run_config: Mapping[str, Any],
    resume: bool = True,
    progress: bool = True,
    collate: Callable | None = None,
    evaluate: EvalFn | None = None,
    lr_by_prefix: Mapping[str, float] | None = None,
) -> TrainResult:
    """Train ``setup.model`` (module "captioner", one AdamW) with ``step``; artifacts carry
    ``card``. Batches are (embedding, tokens) pairs unless ``collate`` says otherwise;
    ``evaluate`` adds validation metrics beyond ``val_step``'s; ``lr_by_prefix`` gives parts
    of the model (by parameter-name prefix) learning rates of their own."""
    trainer = Trainer(
        train,
        {"captioner": setup.model},
        [OptimizerSpec("captioner", lr_by_prefix=dict(lr_by_prefix or {}))],
        setup.train_data,
        step,
        save_with_card(card, setup.tokenizer),
        collate=collate or pad_collate(setup.tokenizer.pad_token_id),
        val_data=setup.val_data if len(setup.val_data) else None,
        val_step=val_step,
        evaluate=evaluate,
        run_config=run_config,
        progress=progress,
    )
    return trainer.fit(resume=resume)
