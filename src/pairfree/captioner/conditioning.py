"""How a CLIP embedding becomes the decoder's condition, in training and at inference.

One typed spec (:class:`Conditioning`) is saved in every checkpoint card and applied by one
function (:func:`condition`) in both places, so a decoder is always fed at inference what it
was trained to read:

- ``normalize``: L2-normalize the CLIP embedding first (CapDec); the GANs use it raw;
- noise (training only): ``x = normalize(normalize(t) + eps)``, eps Gaussian with variance
  ``noise_variance`` per dimension, or uniform in a ball of radius ``sqrt(noise_variance)``
  (CapDec's ``noise_injection``). As there, the noisy vector is renormalized even with
  ``normalize=False``;
- a modality offset (mean image minus mean text embedding, from ``pairfree offset``): added to
  text embeddings before that renormalization in training (``offset_mode="train"``), or
  subtracted from image embeddings at inference (``offset_mode="inference"``) without
  renormalizing, as CapDec's ``predictions_runner`` does.

One deliberate difference: CapDec's ``noise_injection`` returns its input untouched at zero
noise variance, so a train-mode offset is silently dropped there; here the offset is added
(and the result renormalized) whatever the variance, since asking for it and losing it is a
bug. Apart from that, zero noise and no offset leave the (normalized) embedding as it is.
- DeCap projection: the result is replaced by its softmax-weighted average over a memory of
  caption text embeddings (``project_to``, a text feature store; ``tau``), at inference, and
  in training too with ``project_in_training`` (SaCap projects its synthetic training images
  as it projects test images);
- a hard prompt (cross-attention captioners): the ``prompt_topk`` phrases of a phrase
  vocabulary (``prompt_phrases``, a text feature store) closest to the image, see
  :mod:`pairfree.captioner.prompts`;
- an entity-aware hard prompt (prefix captioners, ViECap): the classes of an entity
  classifier (``entity_classes``, a text feature store of class embeddings whose texts are
  the class names) found in the image, see :mod:`pairfree.captioner.entities`; or (IFCap's
  entity filtering, ``entity_min_count`` > 0) the words of ``entity_words`` named at least
  that many times in the image's ``retrieval_captions`` nearest captions;
- retrieved captions (IFCap's fusion mapper): the raw text embeddings of the image's
  ``retrieval_k`` nearest captions in ``retrieval_memory`` (a text feature store with its
  texts) join the condition, see :class:`pairfree.captioner.mapper.FusionMapper`. The
  search reads the captioner's CLIP, or a second one (``retrieval_clip``, IFCap's RN50x64)
  whose text embeddings of the same captions, in the same order, are ``retrieval_keys``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from pairfree.errors import PairfreeError
from pairfree.projection import project_to_memory

NOISE_KINDS = ("gaussian", "uniform")
OFFSET_MODES = ("none", "train", "inference")


@dataclass
class Conditioning:
    normalize: bool = True
    noise_variance: float = 0.0
    noise_kind: str = "gaussian"  # gaussian | uniform (in a ball of radius sqrt(variance))
    offset: list[float] | None = None  # the modality offset, when offset_mode is not "none"
    offset_mode: str = "none"  # none | train (added to text) | inference (subtracted from images)
    project_to: str | None = None  # text feature store: DeCap projection memory at inference
    tau: float = 0.01  # projection temperature
    project_in_training: bool = False  # project training embeddings too (SaCap)
    prompt_phrases: str | None = None  # text feature store of the hard-prompt vocabulary
    prompt_topk: int = 3  # phrases per hard prompt
    entity_classes: str | None = None  # text feature store of the entity classifier (ViECap)
    entity_topk: int = 3  # at most this many entities per hard prompt
    entity_threshold: float = 0.4  # each with at least this class probability
    entity_temperature: float = 0.01  # softmax(cosine / temperature) over the classes
    entity_min_count: int = 0  # > 0: entities by filtering retrieved captions (IFCap), not CLIP
    entity_words: list[str] | None = None  # the words entity filtering counts
    retrieval_memory: str | None = None  # text feature store of the captions retrieved (IFCap)
    retrieval_k: int = 5  # retrieved captions the fusion mapper reads
    retrieval_captions: int = 9  # retrieved captions entity filtering counts in
    retrieval_clip: str | None = None  # the CLIP that searches the memory; None: the captioner's
    retrieval_keys: str | None = None  # the memory's captions under retrieval_clip, same order

    def __post_init__(self) -> None:
        if self.noise_kind not in NOISE_KINDS:
            raise PairfreeError(
                f"unknown noise kind {self.noise_kind!r}: expected one of {NOISE_KINDS}"
            )
        if self.offset_mode not in OFFSET_MODES:
            raise PairfreeError(
                f"offset mode must be one of {OFFSET_MODES}, not {self.offset_mode!r}"
            )
        if self.offset_mode != "none" and self.offset is None:
            raise PairfreeError(
                f"offset mode {self.offset_mode!r} needs the offset (run `pairfree offset`)"
            )
        if self.noise_variance < 0:
            raise PairfreeError(f"noise variance must be >= 0, not {self.noise_variance}")
        if self.project_in_training and self.project_to is None:
            raise PairfreeError("project_in_training needs project_to (the projection memory)")
        if self.prompt_topk < 1 or self.entity_topk < 1:
            raise PairfreeError(f"prompt_topk and entity_topk must be >= 1, not "
                                f"{self.prompt_topk}, {self.entity_topk}")  # fmt: skip
        if not self.entity_temperature > 0:
            raise PairfreeError(f"entity_temperature must be > 0, not {self.entity_temperature}")
        if self.retrieval_k < 1 or self.retrieval_captions < 1 or self.entity_min_count < 0:
            raise PairfreeError(f"retrieval_k and retrieval_captions must be >= 1 and "
                                f"entity_min_count >= 0, not {self.retrieval_k}, "
                                f"{self.retrieval_captions}, {self.entity_min_count}")  # fmt: skip
        if self.entity_min_count > 0 and (not self.entity_words or not self.retrieval_memory):
            raise PairfreeError("entity filtering (entity_min_count > 0) needs entity_words "
                                "and the retrieval_memory it counts them in")  # fmt: skip
        if (self.retrieval_clip is None) != (self.retrieval_keys is None):
            raise PairfreeError("retrieval_clip and retrieval_keys (its text embeddings of the "
                                "memory's captions) go together")  # fmt: skip
        if self.retrieval_keys is not None and self.retrieval_memory is None:
            raise PairfreeError("retrieval_keys search a retrieval_memory: name it")
        if self.prompt_phrases is not None and self.entity_classes is not None:
            raise PairfreeError(
                "a hard prompt comes from prompt_phrases or entity_classes, not both"
            )


def uniform_ball(shape: torch.Size, radius: float, generator: torch.Generator | None = None):
    """Points uniform in a d-ball of ``radius``: a random direction times radius * U^(1/d)."""
    direction = F.normalize(torch.randn(shape, generator=generator), dim=-1)
    u = torch.rand(shape[:-1] + (1,), generator=generator)
    return direction * radius * u ** (1.0 / shape[-1])


def condition(
    x: torch.Tensor,
    spec: Conditioning,
    *,
    training: bool,
    memory: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The decoder's condition for embeddings ``x`` [B, d] under ``spec``.

    ``training`` selects the training side (noise, a train-mode offset, projection onto
    ``memory`` with ``project_in_training``) or the inference side (an inference-mode offset,
    projection onto ``memory``). ``generator`` draws the noise (default: the global RNG).
    """
    if spec.normalize:
        x = F.normalize(x, dim=-1)
    perturbed = False
    if training and spec.noise_variance > 0:
        std = math.sqrt(spec.noise_variance)
        if spec.noise_kind == "gaussian":
            noise = torch.randn(x.shape, generator=generator) * std
        else:
            noise = uniform_ball(x.shape, std, generator)
        x = x + noise.to(x.device, x.dtype)
        perturbed = True
    if spec.offset_mode == ("train" if training else "inference"):
        offset = torch.tensor(spec.offset, dtype=x.dtype, device=x.device)
        if training:
            x, perturbed = x + offset, True
        else:
            x = x - offset
    if perturbed:  # CapDec renormalizes a perturbed text embedding, with or without normalize
        x = F.normalize(x, dim=-1)
    if spec.project_to is not None and (spec.project_in_training or not training):
        if memory is None:
            raise PairfreeError(f"projection onto {spec.project_to} needs its memory loaded")
        x = project_to_memory(x, memory.to(x.device), spec.tau)
    return x


def modality_offset(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Mean normalized image embedding minus mean normalized text embedding (the gap)."""
    return F.normalize(image_embeds, dim=-1).mean(0) - F.normalize(text_embeds, dim=-1).mean(0)


def save_offset(path: str | Path, offset: torch.Tensor, *, clip: str, pairs: int) -> None:
    save_file({"offset": offset.contiguous()}, str(path), {"clip": clip, "pairs": str(pairs)})


def load_offset(path: str | Path) -> list[float]:
    path = Path(path)
    if not path.is_file():
        raise PairfreeError(f"offset file {path} does not exist (run `pairfree offset`)")
    return load_file(str(path))["offset"].tolist()
