"""Nearest-neighbour search over caption embeddings, by cosine, memory bounded.

One search serves ICSD's caption grouping (:mod:`pairfree.synth.grouping`) and IFCap's
retrieval (the training captions' image-like neighbours, a test image's captions). Two
backends give the same neighbours: an exact search in torch that scores a block of queries
at a time (``[block, N]`` similarities, never ``[Q, N]``; the block shrinks as the database
grows, so a million-caption database stays within about a gigabyte), and faiss
(``IndexFlatIP`` on normalized rows, exact; ``IndexIVFFlat`` above ``ivf_threshold`` rows,
approximate, for millions of captions).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pairfree.captioner.conditioning import Conditioning, condition
from pairfree.errors import PairfreeError

BACKENDS = ("exact", "faiss")
SCORE_BUDGET = 1 << 28  # similarities scored at once by the exact search (1 GiB of float32)


class CaptionIndex:
    """A database of embeddings searched by cosine: exact in torch, or faiss. The exact
    search keeps the rows as given (no normalized copy: a caller that also reads the raw rows,
    as IFCap's decoder does, holds them once) and divides by their norms as it scores."""

    def __init__(
        self,
        database: torch.Tensor,
        *,
        backend: str = "exact",
        ivf_threshold: int = 1_000_000,
        nprobe: int = 32,
    ) -> None:
        if backend not in BACKENDS:
            raise PairfreeError(f"unknown search backend {backend!r}: expected one of {BACKENDS}")
        self.block = max(1, min(4096, SCORE_BUDGET // max(1, len(database))))
        self.faiss = self.db = self.inverse_norms = None
        if backend == "faiss":
            unit = F.normalize(database.float(), dim=-1).numpy()
            self.faiss = _faiss_index(unit, ivf_threshold=ivf_threshold, nprobe=nprobe)
        else:
            self.db = database.float()
            self.inverse_norms = 1.0 / self.db.norm(dim=-1).clamp(min=1e-12)
        self.size = len(database)

    def __len__(self) -> int:
        return self.size

    def search(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """[Q, k] indices of each query's k most similar rows, most similar first."""
        if not 1 <= k <= len(self):
            raise PairfreeError(f"{k} neighbours need 1 <= k <= {len(self)} database rows")
        out = torch.empty(len(queries), k, dtype=torch.long)
        for start in range(0, len(queries), self.block):
            q = F.normalize(queries[start : start + self.block].float(), dim=-1)
            if self.faiss is None:
                found = ((q @ self.db.T) * self.inverse_norms).topk(k, dim=1).indices
            else:
                q = np.ascontiguousarray(q.numpy(), dtype=np.float32)
                found = torch.from_numpy(self.faiss.search(q, k)[1].astype(np.int64))
            out[start : start + len(q)] = found
        return out


def nearest_rows(
    queries: torch.Tensor, database: torch.Tensor, k: int, *, backend: str = "exact", **options
) -> torch.Tensor:
    """[Q, k] indices of each query's k most similar database rows by cosine, most similar
    first (``options``: faiss's ``ivf_threshold`` and ``nprobe``)."""
    return CaptionIndex(database, backend=backend, **options).search(queries, k)


def image_like_neighbours(
    embeddings: torch.Tensor,
    k: int,
    *,
    noise_variance: float,
    generator: torch.Generator,
    backend: str = "exact",
    block: int = 65536,
) -> torch.Tensor:
    """IFCap's image-like retrieval: [N, k] indices of the k captions nearest to each
    caption's noised embedding ``normalize(normalize(t) + eps)``, eps ~ N(0, variance I),
    the caption itself excluded (a duplicate of its text elsewhere in the corpus may be
    found, as in the original). Variance 0 is plain text-to-text retrieval."""
    n = len(embeddings)
    if not 1 <= k < n:
        raise PairfreeError(f"{k} retrieved captions need 1 <= k < {n} corpus captions")
    index = CaptionIndex(embeddings, backend=backend)
    noise = Conditioning(normalize=True, noise_variance=noise_variance)  # CapDec's injection
    out = torch.empty(n, k, dtype=torch.long)
    for start in range(0, n, block):
        q = embeddings[start : start + block].float()
        q = condition(q, noise, training=True, generator=generator)  # normalized, noised
        found = index.search(q, k + 1)
        other = found != torch.arange(start, start + len(q))[:, None]
        keep = other & (other.cumsum(dim=1) <= k)  # the first k that are not the caption
        out[start : start + len(q)] = found[keep].view(len(q), k)
    return out


def _faiss_index(db: np.ndarray, *, ivf_threshold: int, nprobe: int):
    try:
        import faiss
    except ImportError as err:
        raise PairfreeError(
            "searching with faiss needs faiss-cpu (or faiss-gpu): pip install faiss-cpu"
        ) from err
    db = np.ascontiguousarray(db, dtype=np.float32)
    n, d = db.shape
    if n > ivf_threshold:
        lists = int(4 * np.sqrt(n))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(db)
        index.nprobe = nprobe
    else:
        index = faiss.IndexFlatIP(d)
    index.add(db)
    return index
