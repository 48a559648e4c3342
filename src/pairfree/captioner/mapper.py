"""Mappers from a condition vector (a CLIP embedding) to k prefix embeddings of the LM.

Both follow ClipCap's modules parameter for parameter, with the same attribute names, so an
original ClipCap/CapDec checkpoint loads by renaming ``clip_project.`` to ``mapper.``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pairfree.captioner.config import CaptionerConfig

MAPPER_HEADS = 8
MAPPER_MLP_RATIO = 2.0


class MLPMapper(nn.Module):
    """Linear(d, h·k/2) -> Tanh -> Linear(h·k/2, h·k), reshaped to k prefix embeddings."""

    def __init__(self, embed_dim: int, hidden_size: int, prefix_length: int) -> None:
        super().__init__()
        self.prefix_length = prefix_length
        self.hidden_size = hidden_size
        out = hidden_size * prefix_length
        self.model = nn.Sequential(
            nn.Linear(embed_dim, out // 2), nn.Tanh(), nn.Linear(out // 2, out)
        )

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        return self.model(condition).view(-1, self.prefix_length, self.hidden_size)


class Attention(nn.Module):
    """Multi-head attention over ``context`` (default: self-attention); queries and
    keys/values without bias, as in ClipCap."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_queries = nn.Linear(dim, dim, bias=False)
        self.to_keys_values = nn.Linear(dim, dim * 2, bias=False)
        self.project = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape
        m = context.shape[1]
        heads = self.num_heads
        q = self.to_queries(x).view(b, n, heads, c // heads).transpose(1, 2)
        kv = self.to_keys_values(context).view(b, m, 2, heads, c // heads)
        k, v = kv.permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.project(out.transpose(1, 2).reshape(b, n, c))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))


class TransformerLayer(nn.Module):
    """Pre-norm block: x + attn(norm1(x), context), then x + mlp(norm2(x)); the context of
    a cross-attention layer is read as it is (no norm), as in IFCap."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), context)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_layers: int, mlp_ratio: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerLayer(dim, num_heads, mlp_ratio) for _ in range(num_layers)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, context)
        return x


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper.

    The condition is projected to ``clip_length`` tokens, k learned constant tokens are appended,
    and after the transformer the outputs at the constant positions are the prefix: the constants
    act as queries that read the condition.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_size: int,
        prefix_length: int,
        clip_length: int,
        num_layers: int,
        num_heads: int = MAPPER_HEADS,
        mlp_ratio: float = MAPPER_MLP_RATIO,
    ) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(
                f"the LM's embedding size {hidden_size} is not divisible by {num_heads} heads"
            )
        self.clip_length = clip_length
        self.linear = nn.Linear(embed_dim, clip_length * hidden_size)
        self.prefix_const = nn.Parameter(torch.randn(prefix_length, hidden_size))
        self.transformer = Transformer(hidden_size, num_heads, num_layers, mlp_ratio)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        b = condition.shape[0]
        x = self.linear(condition).view(b, self.clip_length, -1)
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1)
        return self.transformer(torch.cat((x, const), dim=1))[:, self.clip_length :]


class FusionMapper(TransformerMapper):
    """IFCap's mapper: ClipCap's transformer mapper whose condition tokens first read the
    retrieved captions' embeddings.

    The condition is ``[B, 1 + k, d]``: the (noised) CLIP embedding, then the raw text
    embeddings of its k retrieved captions. The embedding is projected to ``clip_length``
    tokens, which cross-attend (one pre-norm layer, 8 heads) to a linear projection of the
    retrieved embeddings; the result, with the learned constant tokens appended, goes through
    the transformer, whose outputs at the constant positions are the prefix.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_size: int,
        prefix_length: int,
        clip_length: int,
        num_layers: int,
        num_heads: int = MAPPER_HEADS,
        mlp_ratio: float = MAPPER_MLP_RATIO,
    ) -> None:
        super().__init__(embed_dim, hidden_size, prefix_length, clip_length, num_layers,
                         num_heads, mlp_ratio)  # fmt: skip
        self.rt_linear = nn.Linear(embed_dim, hidden_size)
        self.crossatt = Transformer(hidden_size, num_heads, 1, mlp_ratio)

    def forward(self, condition: torch.Tensor) -> torch.Tensor:
        b = condition.shape[0]
        x = self.linear(condition[:, 0]).view(b, self.clip_length, -1)
        x = self.crossatt(x, self.rt_linear(condition[:, 1:]))
        const = self.prefix_const.unsqueeze(0).expand(b, -1, -1)
        return self.transformer(torch.cat((x, const), dim=1))[:, self.clip_length :]


def build_mapper(config: CaptionerConfig, hidden_size: int) -> nn.Module:
    """The mapper named by ``config.mapper`` for an LM whose input embeddings have ``hidden_size``."""
    if config.mapper == "mlp":
        return MLPMapper(config.embed_dim, hidden_size, config.prefix_length)
    mapper = FusionMapper if config.mapper == "fusion" else TransformerMapper
    return mapper(
        config.embed_dim,
        hidden_size,
        config.prefix_length,
        config.clip_length,
        config.mapper_layers,
    )
