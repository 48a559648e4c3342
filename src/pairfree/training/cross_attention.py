"""Training data and objective of cross-attention captioners (SaCap, ICSD).

A training example is (soft-prompt condition, a row of a grid feature store, hard-prompt
token ids, caption token ids). Grid features are large, so they stay in the memory-mapped
store and a batch reads only its rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from pairfree.captioner import CheckpointCard, caption_log_probs
from pairfree.captioner.cross_attention import CrossAttentionCaptioner, pad_prompts
from pairfree.features import FeatureStore
from pairfree.training.text_only import CaptionerSetup, fit_captioner, token_weighted
from pairfree.training.trainer import (
    StepFn,
    TrainConfig,
    TrainResult,
    ValFn,
)


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
    """Examples over one grid feature store."""

    def __init__(self, examples: Sequence[GridExample], grids: FeatureStore) -> None:
        self.examples, self.grids = list(examples), grids

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
        ex = self.examples[i]
        return ex.condition, torch.from_numpy(self.grids[ex.grid_row]), ex.prompt, ex.caption

    def subset(self, indices: Sequence[int]) -> GridCaptionDataset:
        return GridCaptionDataset([self.examples[i] for i in indices], self.grids)


def grid_collate(pad_id: int, max_prompt_tokens: int):
    """Stack conditions and grids, left-pad prompts, right-pad captions (masks mark tokens)."""

    def collate(batch):
        conditions, grids, prompts, captions = zip(*batch, strict=True)
        prompt_ids, prompt_mask = pad_prompts(prompts, max_tokens=max_prompt_tokens, pad_id=pad_id)
        width = max(len(c) for c in captions)
        ids = torch.full((len(captions), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(captions), width), dtype=torch.long)
        for row, c in enumerate(captions):
            ids[row, : len(c)] = torch.tensor(c, dtype=torch.long)
            mask[row, : len(c)] = 1
        return torch.stack(conditions), torch.stack(grids), prompt_ids, prompt_mask, ids, mask

    return collate


def _soft(model: CrossAttentionCaptioner, condition: torch.Tensor) -> torch.Tensor | None:
    return condition if model.soft_prompt is not None else None


def grid_caption_step() -> StepFn:
    """Token cross-entropy of the caption given its image's grid, soft and hard prompt."""

    def step(ctx, batch):
        cond, grid, prompt_ids, prompt_mask, ids, mask = batch
        model = ctx.modules["captioner"]
        loss = model(_soft(ctx.unwrap("captioner"), cond), grid, prompt_ids, prompt_mask, ids,
                     mask).loss  # fmt: skip
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


def fit_cross_attention(
    train: TrainConfig,
    setup: CaptionerSetup,
    card: CheckpointCard,
    *,
    run_config: Mapping[str, Any],
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Train a cross-attention captioner (module "captioner", one AdamW) on grid examples;
    artifacts carry ``card``."""
    tokenizer = setup.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return fit_captioner(
        train,
        setup,
        grid_caption_step(),
        grid_caption_val_step(),
        card,
        run_config=run_config,
        resume=resume,
        progress=progress,
        collate=grid_collate(pad or 0, setup.model.config.max_prompt_tokens),
    )
