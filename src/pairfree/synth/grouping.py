"""Caption grouping (ICSD): for every caption, its k nearest captions by cosine of CLIP text
embeddings, itself included (k = 30 in ICSD).

The search is :mod:`pairfree.retrieval`'s: exact in torch (a block of similarities at a
time), or faiss (``IndexFlatIP``, exact; ``IndexIVFFlat`` above ``ivf_threshold`` rows,
approximate, for millions of captions); both give the same groups.
"""

from __future__ import annotations

import torch

from pairfree.errors import PairfreeError
from pairfree.retrieval import nearest_rows


def nearest_captions(
    embeddings: torch.Tensor,
    k: int = 30,
    *,
    backend: str = "exact",
    ivf_threshold: int = 1_000_000,
    nprobe: int = 32,
) -> torch.Tensor:
    """[N, k] indices of each row's k most similar rows (cosine), most similar first; a
    row is its own nearest neighbour (ties between identical captions aside)."""
    n = len(embeddings)
    if not 1 <= k <= n:
        raise PairfreeError(f"groups of {k} need 1 <= k <= {n} captions")
    if backend not in ("exact", "faiss"):
        raise PairfreeError(f"unknown grouping backend {backend!r}: expected 'exact' or 'faiss'")
    found = nearest_rows(embeddings, embeddings, k, backend=backend,
                         ivf_threshold=ivf_threshold, nprobe=nprobe)  # fmt: skip
    # itself first (an identical caption may rank before it), then the k - 1 nearest others
    own = torch.arange(n)[:, None]
    others = found != own
    keep = others & (others.cumsum(dim=1) <= k - 1)
    return torch.cat((own, found[keep].view(n, k - 1)), dim=1)
