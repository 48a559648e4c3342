"""Caption grouping (ICSD): for every caption, its k nearest captions by cosine of CLIP text
embeddings, itself included (k = 30 in ICSD).

Two paths give the same groups: an exact chunked search in torch (a [chunk, N] block of
similarities at a time, never [N, N]), and faiss (``IndexFlatIP`` on normalized rows, exact;
``IndexIVFFlat`` above ``ivf_threshold`` rows, approximate, for millions of captions).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pairfree.errors import PairfreeError


def nearest_captions(
    embeddings: torch.Tensor,
    k: int = 30,
    *,
    backend: str = "exact",
    chunk: int = 4096,
    ivf_threshold: int = 1_000_000,
    nprobe: int = 32,
) -> torch.Tensor:
    """[N, k] indices of each row's k most similar rows (cosine), most similar first; a
    row is its own nearest neighbour (ties between identical captions aside)."""
    n = len(embeddings)
    if not 1 <= k <= n:
        raise PairfreeError(f"groups of {k} need 1 <= k <= {n} captions")
    x = F.normalize(embeddings.float(), dim=-1)
    if backend == "exact":
        out = torch.empty(n, k, dtype=torch.long)
        for start in range(0, n, chunk):
            scores = x[start : start + chunk] @ x.T
            rows = torch.arange(start, min(start + chunk, n))
            scores[torch.arange(len(rows)), rows] = float("inf")  # itself first
            out[start : start + chunk] = scores.topk(k, dim=1).indices
        return out
    if backend == "faiss":
        return _faiss_search(x.numpy(), k, ivf_threshold=ivf_threshold, nprobe=nprobe)
    raise PairfreeError(f"unknown grouping backend {backend!r}: expected 'exact' or 'faiss'")


def _faiss_search(x: np.ndarray, k: int, *, ivf_threshold: int, nprobe: int) -> torch.Tensor:
    try:
        import faiss
    except ImportError as err:
        raise PairfreeError(
            "grouping with faiss needs faiss-cpu (or faiss-gpu): pip install faiss-cpu"
        ) from err
    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n > ivf_threshold:
        lists = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(x)
        index.nprobe = nprobe
    else:
        index = faiss.IndexFlatIP(d)
    index.add(x)
    _, found = index.search(x, k)
    found = torch.from_numpy(found.astype(np.int64))
    # itself first, as the exact path puts it (faiss may rank an identical caption before it)
    own = torch.arange(n)[:, None]
    others = [row[row != i][: k - 1] for i, row in zip(own[:, 0].tolist(), found, strict=True)]
    return torch.cat((own, torch.stack(others)), dim=1)
