"""Softmax pooling over a text-embedding memory, streamed so the memory may be huge.

DeCap-style projection: ``proj(v) = normalize(softmax(cos(v, T) / tau) @ T)`` with T the
normalized CLIP text embeddings of a memory of corpus captions; a text-trained decoder then
sees a point built from text embeddings instead of an image embedding across the modality gap.
CgT-GAN's aggregated textual embedding is the same pooling with un-normalized rows.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from pairfree.errors import PairfreeError


def softmax_pool(
    v: torch.Tensor, blocks: Iterable[torch.Tensor], scale: float, *, normalize_values: bool
) -> torch.Tensor:
    """``sum_i softmax_i(scale * cos(v, m_i)) * m_i`` over memory rows given in blocks.

    A running log-sum-exp keeps the largest intermediate at [B, block], never [B, N].
    ``normalize_values`` pools the normalized rows instead of the rows as they are.
    """
    v = F.normalize(v.float(), dim=-1)
    running_max = torch.full((len(v), 1), -float("inf"), device=v.device)
    total = torch.zeros(len(v), v.shape[1], device=v.device)
    denom = torch.zeros(len(v), 1, device=v.device)
    for block in blocks:
        if block.shape[1] != v.shape[1]:
            raise PairfreeError(
                f"memory embeddings have dim {block.shape[1]}, queries {v.shape[1]}: "
                "they must come from the same CLIP"
            )
        block = block.float().to(v.device)
        keys = F.normalize(block, dim=-1)
        logits = scale * (v @ keys.T)
        new_max = torch.maximum(running_max, logits.max(dim=1, keepdim=True).values)
        rescale = torch.exp(running_max - new_max)
        weights = torch.exp(logits - new_max)
        total = total * rescale + weights @ (keys if normalize_values else block)
        denom = denom * rescale + weights.sum(dim=1, keepdim=True)
        running_max = new_max
    if not torch.isfinite(running_max).all():
        raise PairfreeError("the memory is empty: nothing to pool over")
    return total / denom


def project_to_memory(
    v: torch.Tensor, memory: torch.Tensor, tau: float = 0.01, *, chunk: int = 65536
) -> torch.Tensor:
    """Project rows of ``v`` [B, d] onto ``memory`` [N, d] (DeCap, temperature ``tau``)."""
    blocks = (memory[start : start + chunk] for start in range(0, len(memory), chunk))
    return F.normalize(softmax_pool(v, blocks, 1.0 / tau, normalize_values=True), dim=-1)
