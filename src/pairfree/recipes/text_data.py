"""Caption tokens and batching shared by the recipes that train on text."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from pairfree.errors import PairfreeError


@dataclass
class CaptionTokens:
    """Token ids per caption, each ending with the LM's end-of-text token."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[i]

    def subset(self, indices: Sequence[int]) -> CaptionTokens:
        return CaptionTokens([self.ids[i] for i in indices])


def tokenize_captions(tokenizer, texts: Sequence[str], *, max_tokens: int = 40) -> CaptionTokens:
    """Tokenize once up front (fast tokenizers batch this); truncate, then append EOS."""
    if tokenizer.eos_token_id is None:
        raise PairfreeError("the LM's tokenizer has no end-of-text token to end captions with")
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return CaptionTokens([ids[: max_tokens - 1] + [eos] for ids in encoded])


def pad_collate(pad_id: int) -> Callable:
    """Stack conditions, right-pad token ids; the mask (not the pad id) marks real tokens."""

    def collate(batch):
        conditions, ids = zip(*batch, strict=True)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        return torch.stack([torch.as_tensor(c) for c in conditions]), input_ids, mask

    return collate
