"""DeCap-style projection of an image embedding into the span of a text-embedding memory.

``proj(v) = normalize(softmax(cos(v, T) / tau) @ T)`` with T the normalized CLIP text
embeddings of a memory of corpus captions: a text-trained decoder then sees a point built
from text embeddings instead of an image embedding across the modality gap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project_to_memory(
    v: torch.Tensor, memory: torch.Tensor, tau: float = 0.01, *, chunk: int = 65536
) -> torch.Tensor:
    """Project rows of ``v`` [B, d] onto ``memory`` [N, d]; the memory is read in chunks.

    The softmax over N memory rows is computed with a running log-sum-exp, so a memory of
    millions of captions never forms a [B, N] matrix in full.
    """
    v = F.normalize(v.float(), dim=-1)
    m_max = torch.full((len(v), 1), -float("inf"))
    acc = torch.zeros(len(v), memory.shape[1])
    denom = torch.zeros(len(v), 1)
    for start in range(0, len(memory), chunk):
        t = F.normalize(memory[start : start + chunk].float(), dim=-1)
        logits = v @ t.T / tau
        new_max = torch.maximum(m_max, logits.max(dim=1, keepdim=True).values)
        scale = torch.exp(m_max - new_max)
        w = torch.exp(logits - new_max)
        acc = acc * scale + w @ t
        denom = denom * scale + w.sum(dim=1, keepdim=True)
        m_max = new_max
    return F.normalize(acc / denom, dim=-1)
