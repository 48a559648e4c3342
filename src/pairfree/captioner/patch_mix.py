"""PCM-Net's patch-wise cross-modal mix-up (Luo et al., ECCV 2024): the salient visual patches
of a (synthetic) image stand in for the text features of the concepts they show, so a
captioner trained on synthetic images learns to read the modality it will not be shown the
artefacts of.

For an image with global CLIP embedding g and grid patches projected into CLIP's joint space
(v'_j, DenseCLIP-style: the tower's own head applied to each patch):

1. **salient concepts**: softmax(cos(g, c) / T) over a concept vocabulary's text embeddings;
   the top K (5) concepts, those with probability above a threshold (0: all K) kept;
2. **patch concepts**: each patch's textual stand-in is the softmax(cos(v'_j, c_k) / T)-
   weighted sum of the K salient concepts' embeddings;
3. **replaced patches**: the top M (5) (patch, concept) pairs by cosine over the image's
   N x K grid; a patch in any of them is replaced (so at most M patches are). An M below 1
   is a fraction of N x K.

In training the selected patches are *replaced* by their stand-ins; on real images at test
time the stand-ins of the same patches are *appended* after the patches (the captioner in
:mod:`pairfree.captioner.pcm` does both). T is 0.01 throughout, as the original hard-codes.

The original ranks the pairs by a softmax of the cosines / T, which orders them as the
cosines do; here the cosines themselves are ranked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PatchMixConfig:
    concepts: int = 5  # K: salient concepts per image (CLIPTAG.TOPK)
    patches: float = 5.0  # M: (patch, concept) pairs that pick patches (TOPK2); < 1: a fraction
    temperature: float = 0.01  # T of both softmaxes
    threshold: float = 0.0  # a salient concept counts above this probability (THRES)

    def __post_init__(self) -> None:
        if self.concepts < 1 or not self.patches > 0 or not self.temperature > 0:
            raise ValueError(f"patch mix-up needs concepts >= 1, patches > 0 and temperature > 0, "
                             f"not {self.concepts}, {self.patches}, {self.temperature}")  # fmt: skip


@dataclass
class PatchMix:
    """One batch's mix-up: each patch's textual stand-in and which patches it replaces."""

    concepts: torch.Tensor  # [B, K] the salient concepts' rows in the vocabulary
    stand_ins: torch.Tensor  # [B, N, d] each patch's weighted sum of the salient concepts
    replaced: torch.Tensor  # [B, N] bool: the patches the stand-ins replace (or join)


def salient_concepts(
    image_embeds: torch.Tensor, vocabulary: torch.Tensor, cfg: PatchMixConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, K] rows of the K concepts most probable for each image (softmax(cos / T) over the
    whole vocabulary ``[C, d]``), and [B, K] whether each passes the threshold."""
    logits = F.normalize(image_embeds.float(), dim=-1) @ F.normalize(vocabulary.float(), dim=-1).T
    probs = torch.softmax(logits / cfg.temperature, dim=-1)
    top, rows = probs.topk(min(cfg.concepts, vocabulary.shape[0]), dim=-1)
    return rows, top > cfg.threshold


@torch.no_grad()
def patch_mix(
    image_embeds: torch.Tensor,
    patch_embeds: torch.Tensor,
    vocabulary: torch.Tensor,
    cfg: PatchMixConfig,
) -> PatchMix:
    """The mix-up of images with global embeddings ``[B, d]`` and patches already projected
    into the joint space ``[B, N, d]``, over a concept vocabulary ``[C, d]``."""
    rows, kept = salient_concepts(image_embeds, vocabulary, cfg)
    concepts = F.normalize(vocabulary.float(), dim=-1)[rows] * kept[..., None]  # [B, K, d]
    patches = F.normalize(patch_embeds.float(), dim=-1)
    cosine = patches @ F.normalize(concepts, dim=-1).transpose(1, 2)  # [B, N, K]
    weights = torch.softmax(cosine / cfg.temperature, dim=-1)
    stand_ins = weights @ concepts
    batch, n, k = cosine.shape
    pairs = int(cfg.patches * n * k) if cfg.patches < 1 else int(cfg.patches)
    scores = (cosine * kept[:, None, :]).reshape(batch, n * k)
    picked = scores.topk(max(1, min(pairs, n * k)), dim=-1).indices
    replaced = torch.zeros(batch, n * k, dtype=torch.bool, device=cosine.device)
    replaced.scatter_(1, picked, True)
    return PatchMix(rows, stand_ins, replaced.view(batch, n, k).any(-1))
