"""Batched, gradient-free encoding shared by the CLIP backends."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from PIL import Image

from pairfree.errors import PairfreeError

T = TypeVar("T")


def fingerprint(model: torch.nn.Module, preprocessing: str) -> str:
    """A short digest of a model's weights and its preprocessing, for encoder names.

    Feature stores are keyed by the encoder's name, so a checkpoint re-trained or re-saved at
    the same path, or loaded with other preprocessing, must not reuse the old embeddings. The
    digest covers every tensor's name, shape and a strided sample of its values (fine-tuning
    moves them all), which costs milliseconds where hashing a large model would take seconds.
    """
    digest = hashlib.sha256(preprocessing.encode())
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().flatten()
        sample = flat[:: max(1, flat.numel() // 64)][:64].to("cpu", torch.float32)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:10]


def encode_batched(
    items: Sequence[T],
    encode: Callable[[Sequence[T]], torch.Tensor],
    *,
    batch_size: int,
    empty_shape: tuple[int, ...],
    normalize: bool = False,
) -> torch.Tensor:
    """Run ``encode`` over slices of ``items`` and concatenate, as float32 on CPU.

    Normalization happens after the cast so fp16/bf16 towers still give unit vectors in
    float32. An empty input gives an empty ``[0, *empty_shape]`` tensor.
    """
    (out,) = run_batches(items, lambda batch: (encode(batch),), batch_size, [empty_shape])
    return F.normalize(out, dim=-1) if normalize else out


def run_batches(
    items: Sequence[T],
    encode: Callable[[Sequence[T]], tuple[torch.Tensor, ...]],
    batch_size: int,
    empty_shapes: Sequence[tuple[int, ...]],
) -> tuple[torch.Tensor, ...]:
    """Each of ``encode``'s outputs over slices of ``items``, concatenated as float32 on CPU
    (``[0, *shape]`` tensors for no items).

    ``torch.no_grad`` rather than ``inference_mode``, so no inference tensor (which cannot be
    saved for backward) reaches callers that feed these embeddings to trainable mappers.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if len(items) == 0:
        return tuple(torch.zeros(0, *shape) for shape in empty_shapes)
    with torch.no_grad():
        parts = [
            [t.float().cpu() for t in encode(items[start : start + batch_size])]
            for start in range(0, len(items), batch_size)
        ]
    return tuple(torch.cat(outputs) for outputs in zip(*parts, strict=True))


class BatchedClipEncoder(ABC):
    """The :class:`~pairfree.clip.base.ClipEncoder` methods, built on a backend's one-batch
    encoders: a backend sets ``name``, ``embed_dim`` and ``grid_shape`` and implements the
    three ``_*_batch`` methods on inputs that fit in one forward pass."""

    name: str
    embed_dim: int
    grid_shape: tuple[int, int]
    grid_class_tokens: int = 0  # tokens before the patches in a grid (a ViT's class token)

    @abstractmethod
    def _image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    @abstractmethod
    def _text_batch(self, texts: Sequence[str]) -> torch.Tensor: ...

    @abstractmethod
    def _grid_batch(self, images: Sequence[Image.Image]) -> torch.Tensor: ...

    def _image_and_grid_batch(
        self, images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both from one image-tower pass; this fallback makes two, backends override it."""
        return self._image_batch(images), self._grid_batch(images)

    def encode_images(
        self, images: Sequence[Image.Image], *, normalize: bool = False, batch_size: int = 64
    ) -> torch.Tensor:
        return encode_batched(
            images,
            self._image_batch,
            batch_size=batch_size,
            empty_shape=(self.embed_dim,),
            normalize=normalize,
        )

    def encode_texts(
        self, texts: Sequence[str], *, normalize: bool = False, batch_size: int = 256
    ) -> torch.Tensor:
        return encode_batched(
            texts,
            self._text_batch,
            batch_size=batch_size,
            empty_shape=(self.embed_dim,),
            normalize=normalize,
        )

    def _embed_grid_batch(self, grid: torch.Tensor) -> torch.Tensor:
        raise PairfreeError(f"{self.name}: this CLIP cannot map its grid into its embedding space")

    def embed_grid(self, grid: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        return encode_batched(
            grid, self._embed_grid_batch, batch_size=batch_size,
            empty_shape=(self.grid_shape[0], self.embed_dim),
        )  # fmt: skip

    def encode_image_grid(
        self, images: Sequence[Image.Image], *, batch_size: int = 64
    ) -> torch.Tensor:
        return encode_batched(
            images, self._grid_batch, batch_size=batch_size, empty_shape=self.grid_shape
        )

    def encode_images_and_grid(
        self, images: Sequence[Image.Image], *, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        shapes = [(self.embed_dim,), self.grid_shape]
        embeds, grid = run_batches(images, self._image_and_grid_batch, batch_size, shapes)
        return embeds, grid
