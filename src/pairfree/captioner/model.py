"""The prefix captioner (ClipCap): a mapper turns a condition vector into k prefix embeddings,
and a causal LM continues them with the caption."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from pairfree.captioner import generation
from pairfree.captioner.config import CaptionerConfig
from pairfree.captioner.mapper import build_mapper


@dataclass
class CaptionerOutput:
    loss: torch.Tensor | None
    """Mean token cross-entropy over the caption tokens (prefix and padding excluded)."""
    logits: torch.Tensor
    """[B, T, V]: at position t, the prediction of caption token t."""


class PrefixCaptioner(nn.Module):
    """LM input ``[mapper(condition) ; embed(caption)]``; trained on the caption tokens only
    (a hard prompt may open the token sequence: see ``target_mask``).

    Captions are right-padded batches of token ids with an attention mask; padding may hold any
    valid token id, since it is excluded through the mask.
    """

    def __init__(self, config: CaptionerConfig, lm: PreTrainedModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.lm = lm if lm is not None else AutoModelForCausalLM.from_pretrained(config.lm)
        hidden_size = self.lm.get_input_embeddings().weight.shape[1]
        self.mapper = build_mapper(config, hidden_size)
        if config.only_prefix:
            self.lm.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> PrefixCaptioner:
        """As ``nn.Module.train``, but a frozen LM stays in eval mode so its dropout stays off."""
        super().train(mode)
        if self.config.only_prefix:
            self.lm.eval()
        return self

    def prefix_embeds(self, condition: torch.Tensor) -> torch.Tensor:
        """[B, d] condition ([B, 1 + r, d] for the fusion mapper: the embedding and its r
        retrieved captions' embeddings) -> [B, k, h] prefix in the LM's input-embedding space."""
        d = self.config.embed_dim
        if self.config.mapper == "fusion":
            if condition.dim() != 3 or condition.shape[1] < 2 or condition.shape[2] != d:
                raise ValueError(f"the fusion mapper's condition must be [batch, 1 + retrieved, "
                                 f"{d}], got {tuple(condition.shape)}")  # fmt: skip
        elif condition.dim() != 2 or condition.shape[1] != d:
            raise ValueError(f"condition must be [batch, {d}], got {tuple(condition.shape)}")
        return self.mapper(condition)

    def forward(
        self,
        condition: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        target_mask: torch.Tensor | None = None,
    ) -> CaptionerOutput:
        """``target_mask`` marks the tokens the loss is over (default: every real token); the
        others are read but not predicted, as a hard prompt between prefix and caption."""
        logits = self._caption_logits(condition, input_ids, attention_mask)
        targets = attention_mask if target_mask is None else target_mask * attention_mask
        mask = targets.to(torch.float32)
        log_probs = _token_log_probs(logits, input_ids)
        loss = -(log_probs * mask).sum() / mask.sum().clamp(min=1.0)
        return CaptionerOutput(loss=loss, logits=logits)

    def sequence_log_probs(
        self,
        condition: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        length_normalize: bool = True,
    ) -> torch.Tensor:
        """[B] log-probability of each caption (mean per token if ``length_normalize``), with
        gradient: the policy term of self-critical training."""
        logits = self._caption_logits(condition, input_ids, attention_mask)
        return caption_log_probs(logits, input_ids, attention_mask, length_normalize)

    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor,
        prompt_ids: torch.Tensor | None = None,
        prompt_mask: torch.Tensor | None = None,
        **options: Any,
    ) -> list[list[int]]:
        """Caption token ids for each condition, continuing each row's hard prompt (left-padded
        ``prompt_ids`` with their ``prompt_mask``, as ``pad_prompts`` makes them) after the
        prefix where one is given; ``options`` are those of
        :func:`pairfree.captioner.generation.generate` (beams, length, stop tokens, sampling).

        Decoding runs in whatever mode the model is in: call ``.eval()`` first unless dropout
        noise is wanted.
        """
        embedding = self.lm.get_input_embeddings().weight
        prefix = self.prefix_embeds(condition.to(embedding.device, embedding.dtype))
        if prompt_ids is None:
            return generation.generate(self.lm, prefix, **options)
        prompt_ids, prompt_mask = prompt_ids.to(embedding.device), prompt_mask.to(embedding.device)
        embeds, mask = left_aligned(prefix, self.lm.get_input_embeddings()(prompt_ids), prompt_mask)
        return generation.generate(self.lm, embeds, prefix_mask=mask, **options)

    def _caption_logits(
        self, condition: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                "input_ids and attention_mask must both be [batch, length], got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if condition.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{condition.shape[0]} conditions for {input_ids.shape[0]} captions")
        if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("captions must be right-padded (attention_mask 1s, then 0s)")
        tokens = self.lm.get_input_embeddings()(input_ids)
        prefix = self.prefix_embeds(condition).to(tokens.dtype)
        embeds = torch.cat((prefix, tokens), dim=1)
        mask = torch.cat((attention_mask.new_ones(prefix.shape[:2]), attention_mask), dim=1)
        logits = self.lm(inputs_embeds=embeds, attention_mask=mask).logits
        return logits[:, prefix.shape[1] - 1 : -1]


def left_aligned(
    prefix: torch.Tensor, prompt: torch.Tensor, prompt_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, k, h] prefix and [B, L, h] left-padded prompt embeddings -> each row's
    ``prefix ; real prompt``, left-padded to ``k + L``, with its mask (what decoding from
    prefixes of different lengths takes)."""
    batch, k, hidden = prefix.shape
    width = prompt.shape[1]
    embeds = prefix.new_zeros(batch, k + width, hidden)
    mask = prompt_mask.new_zeros(batch, k + width)
    for row, n in enumerate(prompt_mask.sum(dim=1).tolist()):
        start = width - n
        embeds[row, start : start + k] = prefix[row]
        embeds[row, start + k :] = prompt[row, start:]
        mask[row, start:] = 1
    return embeds, mask


def _token_log_probs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] log-probability of each token under its logits (padding included)."""
    return -F.cross_entropy(logits.float().transpose(1, 2), input_ids, reduction="none")


def caption_log_probs(
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    length_normalize: bool = True,
) -> torch.Tensor:
    """[B] log-probability of each caption from its caption-position logits (mean per token
    if ``length_normalize``). Recipes that run the (possibly DDP-wrapped) ``forward`` use this
    on its logits so gradients synchronize across processes."""
    mask = attention_mask.to(torch.float32)
    total = (_token_log_probs(logits, input_ids) * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1.0) if length_normalize else total
