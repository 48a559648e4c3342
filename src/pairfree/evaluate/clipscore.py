"""CLIPScore and RefCLIPScore (Hessel et al. 2021), reference-free caption quality from CLIP.

CLIP-S(c, v) = w * max(cos(v, c), 0) with w = 2.5 and the caption prefixed with
"A photo depicts "; RefCLIP-S(c, R, v) = H-mean(CLIP-S(c, v), max(max_r cos(c, r), 0)).
As in the authors' code, references get the same prefix as candidates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from pairfree.clip.base import ClipEncoder
from pairfree.errors import PairfreeError


def clip_scores_per_image(
    clip: ClipEncoder,
    images: Sequence[Image.Image],
    candidates: Sequence[str],
    references: Sequence[Sequence[str]] | None = None,
    *,
    w: float = 2.5,
    prefix: str = "A photo depicts ",
) -> dict[str, torch.Tensor]:
    """Per-image ``CLIPScore`` (and ``RefCLIPScore`` when references are given), unscaled."""
    if not candidates:
        raise PairfreeError("CLIPScore needs at least one candidate caption")
    if len(images) != len(candidates):
        raise PairfreeError(f"{len(images)} images but {len(candidates)} candidate captions")
    image_emb = clip.encode_images(images, normalize=True).double()
    cand_emb = clip.encode_texts([prefix + c for c in candidates], normalize=True).double()
    clip_s = w * (image_emb * cand_emb).sum(-1).clamp(min=0)
    if references is None:
        return {"CLIPScore": clip_s}

    if len(references) != len(candidates):
        raise PairfreeError(f"{len(references)} reference lists but {len(candidates)} candidates")
    empty = [n for n, refs in enumerate(references) if not refs]
    if empty:
        raise PairfreeError(f"RefCLIPScore needs references; none for candidates {empty[:5]}")
    ref_emb = clip.encode_texts([prefix + r for refs in references for r in refs], normalize=True)
    owner = torch.repeat_interleave(torch.tensor([len(refs) for refs in references]))
    ref_cos = (cand_emb[owner] * ref_emb.double()).sum(-1)
    best = torch.full_like(clip_s, -1.0).scatter_reduce(0, owner, ref_cos, "amax").clamp(min=0)
    total = clip_s + best
    ref_clip_s = torch.where(total > 0, 2 * clip_s * best / total.clamp(min=1e-12), 0.0)
    return {"CLIPScore": clip_s, "RefCLIPScore": ref_clip_s}


def clip_scores(
    clip: ClipEncoder,
    images: Sequence[Image.Image],
    candidates: Sequence[str],
    references: Sequence[Sequence[str]] | None = None,
    *,
    w: float = 2.5,
    prefix: str = "A photo depicts ",
) -> dict[str, float]:
    """Mean ``CLIPScore`` (and ``RefCLIPScore`` when references are given) x100, as reported."""
    per_image = clip_scores_per_image(clip, images, candidates, references, w=w, prefix=prefix)
    return {name: 100.0 * float(values.mean()) for name, values in per_image.items()}
