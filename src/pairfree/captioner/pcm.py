"""PCM-Net's captioner: a transformer encoder-decoder trained from scratch over a word-level
vocabulary (xmodaler's, as the original's), reading the image's global CLIP embedding and its
grid, with the patch-wise cross-modal mix-up (:mod:`pairfree.captioner.patch_mix`) inside.

Visual side, per image: [global; patches] (training: the selected patches replaced by their
concepts' stand-ins; inference: the stand-ins of the selected patches appended, the others
masked out), each through its own Linear to the model width, plus learned positions (an
appended stand-in shares its patch's position) and a token type (1: a stand-in), then ReLU,
LayerNorm and dropout (0.5). Three post-LN encoder layers; the global slot of the output is
a Linear + LayerNorm of the global slot of the input and of every layer's output ("inter-layer
global feature interaction"). Three post-LN decoder layers (masked self-attention,
cross-attention to the encoder output, FFN) over word embeddings with sinusoidal positions
(LayerNorm, dropout 0.1), and a Linear head after dropout (0.5). Width 512, 8 heads, FFN
2048 (ReLU), attention-probability dropout 0.3, other dropouts 0.2, LayerNorm eps 1e-12 in
the layers: xmodaler's BERT layers.

The mix-up compares patches with concepts in CLIP's joint space: the caller passes the grid
and its tokens read by the CLIP's own head (``ClipEncoder.embed_grid``); the concept
vocabulary's text embeddings are a buffer the checkpoint keeps. A grid's leading class tokens
(``class_tokens``: a ViT's) are dropped, so a captioner reads a CLIP's grid as it comes.
``grid_pool`` k average-pools the square patch map k x k before either reads it
(:func:`grid_inputs`): the original's 2 for ViT-L/14, whose 16 x 16 patches become 64.

Where pairfree differs on purpose: the grid is the one pairfree's CLIP backends give, after
the tower's final LayerNorm (the original's patch Linear reads the tokens before it, and
applies that LayerNorm itself for the mix-up), so a pooled patch is the mean of normalized
tokens where the original normalizes the mean; the concept embeddings are saved in the
checkpoint (the original reloads its pickle).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, EncoderDecoderCache

from pairfree.captioner import generation
from pairfree.captioner.patch_mix import PatchMixConfig, patch_mix

EPS = 1e-12  # BERT's LayerNorm eps, xmodaler's in every layer


@dataclass
class PCMConfig:
    """Everything needed to rebuild PCM-Net's captioner, nothing about training."""

    vocab_size: int = 10200
    embed_dim: int = 512  # the global CLIP embedding and the concepts' (G_IN_DIM)
    grid_width: int = 768  # the grid's tokens (IN_DIM)
    grid_tokens: int = 49  # patches per image at most (MAX_FEAT_NUM - 1)
    class_tokens: int = 1  # grid tokens before the patches, dropped (ViT: its class token)
    grid_pool: int = 1  # k: the square patch map average-pooled k x k (2 for ViT-L/14)
    concepts: int = 446  # the concept vocabulary's size (its embeddings are a buffer)
    width: int = 512
    heads: int = 8
    ffn: int = 2048
    encoder_layers: int = 3
    decoder_layers: int = 3
    attention_dropout: float = 0.3
    hidden_dropout: float = 0.2
    visual_dropout: float = 0.5
    token_dropout: float = 0.1
    head_dropout: float = 0.5
    max_tokens: int = 20  # caption tokens, end token included (MAX_SEQ_LEN)
    bos_id: int = 0  # xmodaler's "." starts and ends a caption
    mix: PatchMixConfig | None = field(default_factory=PatchMixConfig)  # None: no mix-up

    def __post_init__(self) -> None:
        if isinstance(self.mix, dict):
            self.mix = PatchMixConfig(**self.mix)
        for name in ("vocab_size", "embed_dim", "grid_width", "grid_tokens", "grid_pool",
                     "concepts", "width", "heads", "ffn", "encoder_layers", "decoder_layers",
                     "max_tokens"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.class_tokens < 0:
            raise ValueError(f"class_tokens must be >= 0, got {self.class_tokens}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not a multiple of heads {self.heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> PCMConfig:
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown PCM-Net captioner config keys: {unknown}")
        return cls(**d)


def pool_patches(grid: torch.Tensor, class_tokens: int, k: int) -> torch.Tensor:
    """``grid`` [B, class_tokens + s*s, d] with its s x s patch map average-pooled k x k
    (row-major, as a ViT lays out its patches), the class tokens kept first."""
    if k == 1:
        return grid
    head, patches = grid[:, :class_tokens], grid[:, class_tokens:]
    batch, n, width = patches.shape
    side = math.isqrt(n)
    if side * side != n or side % k:
        raise ValueError(f"grid_pool {k} needs a square patch map whose side it divides; "
                         f"this grid has {n} patches")  # fmt: skip
    square = patches.reshape(batch, side, side, width).permute(0, 3, 1, 2)
    pooled = F.avg_pool2d(square.float(), k).to(grid.dtype).flatten(2).transpose(1, 2)
    return torch.cat((head, pooled), dim=1)


def grid_inputs(
    grid: torch.Tensor, embed_grid: Callable[[torch.Tensor], torch.Tensor], cfg: PCMConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """What :class:`PCMCaptioner` reads of a CLIP grid as its encoder stored it: the grid
    (pooled by ``cfg.grid_pool``) and its tokens in the joint space (``embed_grid``, the
    CLIP's ``ClipEncoder.embed_grid``)."""
    pooled = pool_patches(grid, cfg.class_tokens, cfg.grid_pool)
    return pooled, embed_grid(pooled).to(grid.device)


class PostNormLayer(nn.Module):
    """xmodaler's BERT layer: self-attention (causal in the decoder), cross-attention (the
    decoder's), FFN; each sub-layer's output dropped out, added to its input, LayerNormed."""

    def __init__(self, cfg: PCMConfig, *, cross: bool) -> None:
        super().__init__()
        w = cfg.width
        self.attention = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.attention_dropout,
                                               batch_first=True)  # fmt: skip
        self.attention_norm = nn.LayerNorm(w, eps=EPS)
        self.cross = None
        if cross:
            self.cross = nn.MultiheadAttention(w, cfg.heads, dropout=cfg.attention_dropout,
                                               batch_first=True)  # fmt: skip
            self.cross_norm = nn.LayerNorm(w, eps=EPS)
        self.ffn = nn.Sequential(
            nn.Linear(w, cfg.ffn), nn.ReLU(), nn.Dropout(cfg.hidden_dropout), nn.Linear(cfg.ffn, w)
        )
        self.ffn_norm = nn.LayerNorm(w, eps=EPS)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(
        self,
        x: torch.Tensor,
        padding: torch.Tensor | None = None,
        causal: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        memory_padding: torch.Tensor | None = None,
        cache: EncoderDecoderCache | None = None,
        index: int = 0,
    ) -> torch.Tensor:
        """``padding`` / ``memory_padding``: [B, L] True where a key is ignored; ``causal``:
        [T, L] True where a query may not see a key. With ``cache`` (generation; layer
        ``index`` of it) ``x`` are the newest positions: their keys and values join the cached
        ones, and the memory's are projected once."""
        if cache is None:
            h, _ = self.attention(x, x, x, key_padding_mask=padding, attn_mask=causal,
                                  need_weights=False)  # fmt: skip
        else:
            keys, values = cache.self_attention_cache.update(
                project(self.attention, x, 1), project(self.attention, x, 2), index
            )
            h = attend(self.attention, project(self.attention, x, 0), keys, values, causal)
        x = self.attention_norm(x + self.dropout(h))
        if self.cross is not None:
            if cache is None:
                h, _ = self.cross(x, memory, memory, key_padding_mask=memory_padding,
                                  need_weights=False)  # fmt: skip
            else:
                crossed = cache.cross_attention_cache
                if crossed.get_seq_length(index) == 0:
                    crossed.update(project(self.cross, memory, 1), project(self.cross, memory, 2),
                                   index)  # fmt: skip
                keys, values = crossed.layers[index].keys, crossed.layers[index].values
                blocked = None if memory_padding is None else memory_padding[:, None, None, :]
                h = attend(self.cross, project(self.cross, x, 0), keys, values, blocked)
            x = self.cross_norm(x + self.dropout(h))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


def project(attention: nn.MultiheadAttention, x: torch.Tensor, part: int) -> torch.Tensor:
    """``attention``'s query (``part`` 0), key (1) or value (2) projection of ``x`` [B, T, w],
    split into heads: [B, heads, T, w / heads]."""
    w, n = attention.embed_dim, attention.num_heads
    rows = slice(part * w, (part + 1) * w)
    y = F.linear(x, attention.in_proj_weight[rows], attention.in_proj_bias[rows])
    return y.view(*x.shape[:2], n, w // n).transpose(1, 2)


def attend(
    attention: nn.MultiheadAttention,
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    blocked: torch.Tensor | None = None,
) -> torch.Tensor:
    """What ``attention`` (in eval mode) outputs for projected queries, keys and values;
    ``blocked`` True where a query may not see a key."""
    mask = None if blocked is None else ~blocked
    out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask)
    batch, _, t, _ = out.shape
    return attention.out_proj(out.transpose(1, 2).reshape(batch, t, attention.embed_dim))


def sinusoid(positions: torch.Tensor, width: int) -> torch.Tensor:
    """The standard sinusoidal encoding of integer ``positions`` [..., T] -> [..., T, width]."""
    rate = torch.exp(torch.arange(0, width, 2, device=positions.device) * (-math.log(1e4) / width))
    angle = positions[..., None].float() * rate
    return torch.stack((angle.sin(), angle.cos()), dim=-1).flatten(-2)


class WordDecoder(nn.Module):
    """The decoder half, with the keyword interface :func:`generation.generate` drives
    (``inputs_embeds``, ``position_ids``, ``encoder_hidden_states``, ``.logits``, and with
    ``use_cache`` a ``past_key_values`` cache). The cache holds each layer's self-attention
    keys and values so far and its cross-attention ones of the memory, so a step runs one
    position through the layers: the same logits as re-running the whole sequence."""

    def __init__(self, cfg: PCMConfig) -> None:
        super().__init__()
        self.words = nn.Embedding(cfg.vocab_size, cfg.width)
        self.norm = nn.LayerNorm(cfg.width)
        self.dropout = nn.Dropout(cfg.token_dropout)
        self.layers = nn.ModuleList(
            PostNormLayer(cfg, cross=True) for _ in range(cfg.decoder_layers)
        )
        self.head = nn.Sequential(
            nn.Dropout(cfg.head_dropout), nn.Linear(cfg.width, cfg.vocab_size)
        )
        self.config = SimpleNamespace(vocab_size=cfg.vocab_size)  # what generation checks

    def get_input_embeddings(self) -> nn.Embedding:
        return self.words

    def forward(
        self,
        inputs_embeds: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_padding: torch.Tensor | None = None,
        use_cache: bool = False,
        past_key_values: EncoderDecoderCache | None = None,
        **_: Any,
    ) -> SimpleNamespace:
        x = self.words(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values
        if cache is None and use_cache:
            cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        seen = 0 if cache is None else cache.get_seq_length()
        if position_ids is None:
            position_ids = torch.arange(seen, seen + x.shape[1], device=x.device)
            position_ids = position_ids.expand(x.shape[0], -1)
        x = self.dropout(self.norm(x + sinusoid(position_ids, x.shape[-1]).to(x.dtype)))
        t = x.shape[1]
        causal = torch.ones(t, seen + t, dtype=torch.bool, device=x.device).triu(seen + 1)
        for i, layer in enumerate(self.layers):
            x = layer(x, causal=causal, memory=encoder_hidden_states,
                      memory_padding=encoder_padding, cache=cache, index=i)  # fmt: skip
        return SimpleNamespace(logits=self.head(x), past_key_values=cache)


class PCMCaptioner(nn.Module):
    """PCM-Net's encoder-decoder (see the module docstring)."""

    def __init__(self, config: PCMConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.register_buffer("concept_embeds", torch.zeros(cfg.concepts, cfg.embed_dim))
        self.patches = nn.Linear(cfg.grid_width, cfg.width)
        self.global_embed = nn.Linear(cfg.embed_dim, cfg.width)
        self.stand_ins = nn.Linear(cfg.embed_dim, cfg.width)
        self.positions = nn.Parameter(torch.zeros(1, 1 + cfg.grid_tokens, cfg.width))
        nn.init.trunc_normal_(self.positions, std=0.02)
        self.token_types = nn.Embedding(2, cfg.width)
        self.visual_norm = nn.LayerNorm(cfg.width)
        self.visual_dropout = nn.Dropout(cfg.visual_dropout)
        self.encoder = nn.ModuleList(
            PostNormLayer(cfg, cross=False) for _ in range(cfg.encoder_layers)
        )
        self.global_mix = nn.Sequential(
            nn.Linear((cfg.encoder_layers + 1) * cfg.width, cfg.width), nn.LayerNorm(cfg.width)
        )
        self.decoder = WordDecoder(cfg)

    def set_concepts(self, embeds: torch.Tensor) -> None:
        """The concept vocabulary's text embeddings [C, embed_dim] (kept in the checkpoint)."""
        if embeds.shape != self.concept_embeds.shape:
            raise ValueError(f"concept embeddings must be {tuple(self.concept_embeds.shape)}, "
                             f"got {tuple(embeds.shape)}")  # fmt: skip
        self.concept_embeds.copy_(embeds)

    def visual_tokens(
        self,
        image_embeds: torch.Tensor,
        condition: torch.Tensor,
        grid: torch.Tensor,
        grid_embeds: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The encoder input [B, 1 + N (+ N), width] and its key padding mask. ``image_embeds``
        (the clean global embeddings) pick the concepts; ``condition`` (noised in training)
        is the global token; ``grid`` [B, class_tokens + N, grid_width] and ``grid_embeds``
        (its tokens in the joint space, [B, class_tokens + N, embed_dim]) are the CLIP's."""
        cfg = self.config
        most = cfg.class_tokens + cfg.grid_tokens
        if (
            grid.dim() != 3
            or not cfg.class_tokens < grid.shape[1] <= most
            or (grid.shape[2] != cfg.grid_width)
        ):
            raise ValueError(f"grid must be [batch, <= {most}, {cfg.grid_width}] with "
                             f"{cfg.class_tokens} class tokens first, got "
                             f"{tuple(grid.shape)}")  # fmt: skip
        if grid_embeds.shape != (*grid.shape[:2], cfg.embed_dim):
            raise ValueError(f"grid_embeds must be {(*grid.shape[:2], cfg.embed_dim)}, got "
                             f"{tuple(grid_embeds.shape)}")  # fmt: skip
        grid = grid[:, cfg.class_tokens :].to(self.patches.weight.dtype)
        grid_embeds = grid_embeds[:, cfg.class_tokens :]
        batch, n = grid.shape[:2]
        patches = self.patches(grid)
        positions = self.positions[:, : 1 + n]
        types = torch.zeros(batch, 1 + n, dtype=torch.long, device=grid.device)
        padding = torch.zeros(batch, 1 + n, dtype=torch.bool, device=grid.device)
        if cfg.mix is not None:
            mix = patch_mix(image_embeds, grid_embeds, self.concept_embeds, cfg.mix)
            stand_ins = self.stand_ins(mix.stand_ins.to(patches.dtype))
            chosen = mix.replaced[..., None]
            if self.training:
                patches = torch.where(chosen, stand_ins, patches)
                types[:, 1:] = mix.replaced.long()
            else:
                patches = torch.cat((patches, stand_ins), dim=1)
                positions = torch.cat((positions, positions[:, 1:]), dim=1)
                types = torch.cat((types, mix.replaced.long()), dim=1)
                padding = torch.cat((padding, ~mix.replaced), dim=1)
        glob = self.global_embed(condition.to(patches.dtype))[:, None]
        x = torch.cat((glob, patches), dim=1) + positions + self.token_types(types)
        return self.visual_dropout(self.visual_norm(F.relu(x))), padding

    def encode(
        self,
        image_embeds: torch.Tensor,
        condition: torch.Tensor,
        grid: torch.Tensor,
        grid_embeds: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The decoder's cross-attention inputs for these images (see :meth:`visual_tokens`)."""
        x, padding = self.visual_tokens(image_embeds, condition, grid, grid_embeds)
        slots = [x[:, 0]]
        for layer in self.encoder:
            x = layer(x, padding=padding)
            slots.append(x[:, 0])
        x = torch.cat((self.global_mix(torch.cat(slots, dim=-1))[:, None], x[:, 1:]), dim=1)
        return {"encoder_hidden_states": x, "encoder_padding": padding}

    def forward(
        self,
        image_embeds: torch.Tensor,
        condition: torch.Tensor,
        grid: torch.Tensor,
        grid_embeds: torch.Tensor,
        input_ids: torch.Tensor,
    ) -> torch.Tensor:
        """Next-token logits [B, T, V] for the decoder inputs ``input_ids`` (the start token,
        then the caption's tokens)."""
        context = self.encode(image_embeds, condition, grid, grid_embeds)
        return self.decoder(input_ids=input_ids, **context).logits

    @torch.no_grad()
    def generate(
        self,
        image_embeds: torch.Tensor,
        condition: torch.Tensor,
        grid: torch.Tensor,
        grid_embeds: torch.Tensor,
        **options: Any,
    ) -> list[list[int]]:
        """Caption token ids per image (``options``: :func:`generation.generate`'s)."""
        device = self.positions.device
        inputs = (image_embeds, condition, grid, grid_embeds)
        context = self.encode(*(x.to(device) for x in inputs))
        start = torch.full((len(grid), 1), self.config.bos_id, dtype=torch.long, device=device)
        prefix = self.decoder.words(start)
        return generation.generate(self.decoder, prefix, context=context, **options)


def clip_weighted_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    *,
    smoothing: float = 0.1,
    gamma: float = 2.0,
) -> torch.Tensor:
    """PCM-Net's CLIP-weighted cross-entropy: per token, KL(label-smoothed target || p)
    (``smoothing`` spread over the other words), times its caption's weight (``weights`` [B]:
    clamp(alpha * cos(image, caption), 0, 1)), averaged over the real tokens (``targets``
    -100 elsewhere); with ``gamma`` > 0 times the batch's mean (1 - p_target)^gamma over the
    same tokens, gradients through both (the original's ``gamma_type: batch``, its default)."""
    vocab = logits.shape[-1]
    real = targets != -100
    logp = F.log_softmax(logits.float(), dim=-1)[real]  # [R, V]
    target = targets[real]
    true = torch.full_like(logp, smoothing / (vocab - 1))
    true.scatter_(1, target[:, None], 1.0 - smoothing)
    kl = (torch.special.xlogy(true, true) - true * logp).sum(-1)
    loss = (kl * weights[:, None].expand_as(targets)[real]).mean()
    if gamma > 0:
        p = logp.gather(1, target[:, None]).squeeze(1).exp()
        loss = loss * ((1 - p) ** gamma).mean()
    return loss
