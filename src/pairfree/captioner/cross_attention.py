"""The cross-attention captioner (SaCap, ICSD): a text decoder that cross-attends to CLIP
grid features, after an optional soft prompt and a hard prompt.

Decoder input, per row::

    [k soft-prompt embeddings] [hard-prompt tokens] [separator] [caption tokens]

The soft prompt is an MLP of the (conditioned) global CLIP embedding; the hard prompt is text
(SaCap: the image's top object phrases); the separator (":") ends the prompt. Every layer's
cross-attention reads the image's grid features ``[B, L, width]``, projected to the decoder's
width when the two differ. Only the caption tokens are trained.

A captioner may carry its own copy of the CLIP image tower (``image_encoder``; ICSD fine-tunes
it): it then reads pixels and computes the grid itself. The tower's architecture is the one of
the CLIP named on the checkpoint's card; its weights are the captioner's.

Hard prompts differ in length, so they are left-padded inside the row and padding takes no
position: a row's caption starts at position k + (its prompt length) + 1, the same in training
and decoding. (SaCap's code right-pads the prompt to 20 tokens and numbers positions 0..59 in
training, but counts only real tokens when it generates, so the caption it decodes sits at
other positions than the ones it was trained at unless the prompt fills all 20 tokens.)

Any Hugging Face causal LM that supports cross-attention works: GPT-2 gets new, randomly
initialized cross-attention layers beside its pretrained weights (``add_cross_attention``),
BERT becomes a decoder (``is_decoder``) with cross-attention, as BLIP's text decoder is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pairfree.captioner import generation
from pairfree.captioner.model import CaptionerOutput, caption_log_probs
from pairfree.clip.vision import VisionTower
from pairfree.errors import load_failure


@dataclass
class CrossAttentionConfig:
    """Everything needed to rebuild a cross-attention captioner, nothing about training."""

    lm: str = "gpt2"
    """Hub id or local directory of the decoder (cross-attention is added to it)."""
    embed_dim: int = 512
    """Size of the global CLIP embedding the soft prompt is made from."""
    grid_width: int = 768
    """Width of the CLIP grid features cross-attended to."""
    prefix_length: int = 10
    """Soft-prompt embeddings (0: no soft prompt)."""
    soft_prompt_hidden: int = 2048
    """Width of the soft-prompt MLP's two hidden layers (SaCap: 2048)."""
    max_prompt_tokens: int = 20
    """Hard prompts are cut to this many tokens (SaCap: 20)."""
    separator: str = ":"
    """The text that ends the prompt and starts the caption."""
    image_encoder: bool = False
    """The captioner carries (and reads pixels through) its own CLIP image tower."""
    image_size: int | None = None
    """The side of the images its own tower reads (None: the CLIP's native one; checkpoints
    written before this setting existed read that)."""

    def __post_init__(self) -> None:
        for name in ("embed_dim", "grid_width", "soft_prompt_hidden"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("prefix_length", "max_prompt_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.separator:
            raise ValueError("separator must not be empty")
        if self.image_size is not None and self.image_size < 1:
            raise ValueError(f"image_size must be >= 1 (or None), got {self.image_size}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CrossAttentionConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown cross-attention captioner config keys: {unknown}")
        return cls(**d)


def load_cross_attention_lm(lm: str, *, fresh_head: bool = False) -> PreTrainedModel:
    """``lm``'s pretrained weights in a decoder with (new, randomly initialized)
    cross-attention layers; ``is_decoder`` makes an encoder such as BERT causal. With
    ``fresh_head`` the output head's own layers start anew (:func:`reset_output_head`)."""
    config = AutoConfig.from_pretrained(lm)
    config.add_cross_attention = True
    config.is_decoder = True
    model = AutoModelForCausalLM.from_pretrained(lm, config=config)
    if fresh_head:
        reset_output_head(model)
    return model


def build_cross_attention(
    config: CrossAttentionConfig,
    *,
    embed_dim: int,
    grid_width: int,
    seed: int,
    vision: VisionTower | None = None,
    fresh_head: bool = False,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> tuple[CrossAttentionCaptioner, PreTrainedTokenizerBase]:
    """A new captioner and its tokenizer: ``config.lm`` with new cross-attention layers
    (initialized from ``seed``) over grid features ``grid_width`` wide, a soft prompt made from
    ``embed_dim``-dim embeddings (``config.prefix_length`` 0: none) and, with ``vision``, its own
    image tower. ``config`` is left as it is; the model holds the filled-in copy."""
    sizes: dict[str, Any] = {"embed_dim": embed_dim, "grid_width": grid_width}
    if vision is not None:
        sizes |= {"image_encoder": True, "image_size": vision.pixels.image_size}
    built = replace(config, **sizes)
    try:
        tokenizer = tokenizer or AutoTokenizer.from_pretrained(config.lm)
        torch.manual_seed(seed)  # the new layers' initialization is part of the run
        lm = load_cross_attention_lm(config.lm, fresh_head=fresh_head)
    except OSError as err:  # not on disk, and the hub unreachable or the id unknown
        raise load_failure(f"model.lm={config.lm!r}", config.lm, err) from err
    separator = tokenizer(built.separator, add_special_tokens=False)["input_ids"]
    return CrossAttentionCaptioner(built, lm, separator_ids=separator, vision=vision), tokenizer


def reset_output_head(lm: PreTrainedModel) -> list[str]:
    """Initialize the output head's own parameters as a new model's: Linear weights from
    N(0, ``initializer_range``), LayerNorm weights 1, biases 0. Parameters the head shares with
    the base model (the word embeddings a tied head projects with) are kept. BERT's head is its
    ``transform`` (dense, GELU, LayerNorm) and output bias; GPT-2's is the tied embeddings
    alone. Returns the names of the parameters reset.

    BLIP (so ICSD) builds its decoder's head this way: it makes a new ``BertLMHeadModel`` and
    loads pretrained weights into its encoder only."""
    std = getattr(lm.config, "initializer_range", 0.02)
    shared = {id(p) for p in lm.base_model.parameters()}
    reset = []
    with torch.no_grad():
        for name, param in lm.named_parameters():
            if id(param) in shared:
                continue
            owner, _, leaf = name.rpartition(".")
            module = lm.get_submodule(owner)
            if leaf == "bias":
                param.zero_()
            elif isinstance(module, nn.LayerNorm):
                param.fill_(1.0)
            elif isinstance(module, nn.Linear):
                param.normal_(0.0, std)
            else:
                raise ValueError(f"no fresh initialization for {name} ({type(module).__name__})")
            reset.append(name)
    return reset


class SoftPromptMLP(nn.Module):
    """SaCap's soft prompt: Linear(d, 2048) -> ReLU -> Linear(2048, 2048) -> ReLU ->
    Linear(2048, h·k), reshaped to k embeddings."""

    def __init__(self, embed_dim: int, hidden_size: int, prefix_length: int, width: int) -> None:
        super().__init__()
        self.prefix_length, self.hidden_size = prefix_length, hidden_size
        self.model = nn.Sequential(
            nn.Linear(embed_dim, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, hidden_size * prefix_length),
        )

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.model(condition).view(-1, self.prefix_length, self.hidden_size)


class CrossAttentionCaptioner(nn.Module):
    """A decoder over ``[soft prompt; hard prompt; separator; caption]`` that cross-attends
    to grid features (see the module docstring)."""

    def __init__(
        self,
        config: CrossAttentionConfig,
        lm: PreTrainedModel | None = None,
        *,
        separator_ids: Sequence[int],
        vision: VisionTower | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        if config.image_encoder != (vision is not None):
            raise ValueError("a vision tower goes with image_encoder=True, and only with it")
        if vision is not None and config.image_size not in (None, vision.pixels.image_size):
            raise ValueError(f"the vision tower reads {vision.pixels.image_size}-px images, the "
                             f"config says {config.image_size}")  # fmt: skip
        self.vision = vision
        self.lm = lm if lm is not None else load_cross_attention_lm(config.lm)
        if not getattr(self.lm.config, "add_cross_attention", False):
            raise ValueError(f"{config.lm} has no cross-attention layers")
        hidden = self.lm.get_input_embeddings().weight.shape[1]
        self.hidden_size = hidden
        self.grid_projection = (
            nn.Linear(config.grid_width, hidden) if config.grid_width != hidden else nn.Identity()
        )
        self.soft_prompt = (
            SoftPromptMLP(config.embed_dim, hidden, config.prefix_length, config.soft_prompt_hidden)
            if config.prefix_length
            else None
        )
        if not separator_ids:
            raise ValueError(f"the separator {config.separator!r} has no tokens")
        self.register_buffer("separator_ids", torch.tensor(list(separator_ids)), persistent=False)

    def prompt_embeds(
        self, condition: torch.Tensor | None, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[soft; hard prompt; separator]`` embeddings ``[B, k+P+s, h]`` and their mask
        (``prompt_ids`` left-padded ``[B, P]``, padding marked 0 in ``prompt_mask``)."""
        batch = prompt_ids.shape[0]
        embed = self.lm.get_input_embeddings()
        separator = embed(self.separator_ids).expand(batch, -1, -1)
        parts = [embed(prompt_ids), separator]
        masks = [prompt_mask.long(), prompt_mask.new_ones(batch, len(self.separator_ids)).long()]
        if self.soft_prompt is not None:
            if condition is None or condition.shape != (batch, self.config.embed_dim):
                got = None if condition is None else tuple(condition.shape)
                raise ValueError(f"the soft prompt needs a [{batch}, {self.config.embed_dim}] "
                                 f"condition, got {got}")  # fmt: skip
            parts.insert(0, self.soft_prompt(condition).to(separator.dtype))
            masks.insert(0, prompt_mask.new_ones(batch, self.config.prefix_length).long())
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def original_prompt_length(self, *, hard_prompt: bool) -> int:
        """How many ids precede the caption in the original code's decoder input, which is
        what its beam search counts in a hypothesis' length (``score_length="with_prompt"``):
        a placeholder id per soft-prompt embedding, the hard prompt padded to
        ``max_prompt_tokens`` (SaCap's: 10 + 20 + 1 = 31 for every image), the separator
        (ICSD's ``[DEC] a picture of``: 4)."""
        hard = self.config.max_prompt_tokens if hard_prompt else 0
        return self.config.prefix_length + hard + len(self.separator_ids)

    def context(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        """The decoder's cross-attention inputs for grid features ``[B, L, width]`` (pixels
        ``[B, 3, S, S]`` when the captioner has its own image tower)."""
        grid = image
        if self.vision is not None:
            size = self.vision.pixels.image_size
            if image.dim() != 4 or image.shape[1:] != (3, size, size):
                raise ValueError(f"pixels must be [batch, 3, {size}, {size}], got "
                                 f"{tuple(image.shape)}")  # fmt: skip
            grid = self.vision(image.to(next(self.vision.parameters()).dtype))
        if grid.dim() != 3 or grid.shape[2] != self.config.grid_width:
            raise ValueError(
                f"grid features must be [batch, tokens, {self.config.grid_width}], "
                f"got {tuple(grid.shape)}"
            )
        dtype = self.lm.get_input_embeddings().weight.dtype
        return {"encoder_hidden_states": self.grid_projection(grid.to(dtype))}

    def forward(
        self,
        condition: torch.Tensor | None,
        image: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        label_smoothing: float = 0.0,
    ) -> CaptionerOutput:
        """Mean token cross-entropy over the caption tokens (right-padded ``input_ids``),
        smoothed over the whole vocabulary by ``label_smoothing`` (BLIP's decoder, ICSD's:
        0.1); ``logits[:, t]`` predicts caption token t. ``image``: grid features, or pixels
        for a captioner with its own image tower."""
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(
                "input_ids and attention_mask must both be [batch, length], got "
                f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}"
            )
        if (attention_mask[:, 1:] > attention_mask[:, :-1]).any():
            raise ValueError("captions must be right-padded (attention_mask 1s, then 0s)")
        prefix, prefix_mask = self.prompt_embeds(condition, prompt_ids, prompt_mask)
        tokens = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat((prefix, tokens.to(prefix.dtype)), dim=1)
        mask = torch.cat((prefix_mask, attention_mask.long()), dim=1)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        out = self.lm(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **self.context(image)
        )
        logits = out.logits[:, prefix.shape[1] - 1 : -1]
        if label_smoothing:
            targets = input_ids.masked_fill(attention_mask == 0, -100)
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                   label_smoothing=label_smoothing, reduction="sum")  # fmt: skip
        else:
            loss = -caption_log_probs(
                logits, input_ids, attention_mask, length_normalize=False
            ).sum()
        return CaptionerOutput(loss=loss / attention_mask.sum().clamp(min=1), logits=logits)

    @torch.no_grad()
    def generate(
        self,
        condition: torch.Tensor | None,
        image: torch.Tensor,
        prompt_ids: torch.Tensor,
        prompt_mask: torch.Tensor,
        **options: Any,
    ) -> list[list[int]]:
        """Caption token ids per image; ``options`` are those of
        :func:`pairfree.captioner.generation.generate` (``prompt_lengths`` from
        :meth:`original_prompt_length` for ``score_length="with_prompt"``)."""
        weight = self.lm.get_input_embeddings().weight
        device = weight.device
        if condition is not None:
            condition = condition.to(device, weight.dtype)
        prefix, mask = self.prompt_embeds(condition, prompt_ids.to(device), prompt_mask.to(device))
        return generation.generate(
            self.lm, prefix, prefix_mask=mask, context=self.context(image.to(device)), **options
        )


def pad_prompts(
    prompts: Sequence[Sequence[int]], *, max_tokens: int | None = None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token-id prompts (each cut to its first ``max_tokens``) into ids and mask."""
    cut = [list(p)[:max_tokens] for p in prompts]
    width = max((len(p) for p in cut), default=0)
    ids = torch.full((len(cut), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(cut), width), dtype=torch.long)
    for row, p in enumerate(cut):
        if p:
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
    return ids, mask
