"""The one protocol every CLIP backend implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch
from PIL import Image

from pairfree.clip.vision import VisionTower


@runtime_checkable
class ClipEncoder(Protocol):
    """A frozen two-tower encoder. Outputs are float32 on CPU, un-normalized unless asked."""

    name: str
    embed_dim: int
    grid_class_tokens: int

    def encode_images(
        self, images: Sequence[Image.Image], *, normalize: bool = False, batch_size: int = 64
    ) -> torch.Tensor:
        """[N, embed_dim] projected image embeddings."""
        ...

    def encode_texts(
        self, texts: Sequence[str], *, normalize: bool = False, batch_size: int = 256
    ) -> torch.Tensor:
        """[N, embed_dim] projected text embeddings."""
        ...

    def encode_image_grid(
        self, images: Sequence[Image.Image], *, batch_size: int = 64
    ) -> torch.Tensor:
        """[N, L, width] grid features of the image tower (a ViT's CLS and patch tokens, a
        CNN's last feature map), for cross-attending decoders."""
        ...

    def encode_images_and_grid(
        self, images: Sequence[Image.Image], *, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode_images` and :meth:`encode_image_grid` of the same images from one
        pass through the image tower (what a captioner with soft or hard prompts and a
        cross-attending decoder reads: half the image-tower work of calling both)."""
        ...

    def embed_grid(self, grid: torch.Tensor, *, batch_size: int = 64) -> torch.Tensor:
        """[N, L, embed_dim]: each token of :meth:`encode_image_grid`'s features through the
        tower's own head into the joint space, as DenseCLIP reads patches (a ViT's projection;
        a ResNet's attention pool's value and output projections), so a patch compares with
        text embeddings (PCM-Net's mix-up). The first ``grid_class_tokens`` tokens are not
        patches."""
        ...

    def vision_tower(self, image_size: int | None = None) -> VisionTower:
        """A trainable copy of the image tower that gives :meth:`encode_image_grid`'s
        features from pixels (for recipes that fine-tune it, as ICSD does), reading
        ``image_size``-px images (None: the tower's own; a ViT's position embeddings are
        resized, a tower that cannot change resolution raises ``PairfreeError``)."""
        ...
