"""A CLIP image tower as a trainable module, and the pixel transforms that feed it.

Recipes that fine-tune the image encoder (ICSD) take a copy of a CLIP backend's tower
(``ClipEncoder.vision_tower()``) into their captioner: ``tower(pixels)`` gives the same grid
features as the frozen ``encode_image_grid`` (a ViT's CLS and patch tokens after its final
norm; a CNN's last feature map), but with gradients, on pixels the recipe prepared.

A ViT's copy can read another resolution than the one it was trained at
(``vision_tower(image_size)``): its position embeddings are resized once, on the copy, and
then train as its own parameters, as ICSD (BLIP) moved CLIP ViT-B/32 from 224 to 384 px (145
grid tokens instead of 50). A tower without position embeddings to resize (a CNN) keeps its
own resolution.

Pixels come from two transforms, ICSD's (BLIP's): for training a random crop of 50-100 % of
the image resized to the tower's resolution (bicubic) and a random horizontal flip; for
evaluation a plain resize to that square (bicubic). Both normalize with the tower's own
mean and std. A training image's crop and flip are drawn from a generator seeded by (seed,
epoch, example), so they are the same on any number of processes and after a resume.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from pairfree.errors import PairfreeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class PixelSpec:
    """What a tower reads: square images of ``image_size``, normalized by mean and std."""

    image_size: int
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD


class VisionTower(nn.Module):
    """Pixels ``[B, 3, S, S]`` -> grid features ``[B, L, width]``; subclasses wrap a backend's
    tower and set ``pixels`` and ``grid_shape``."""

    pixels: PixelSpec
    grid_shape: tuple[int, int]

    def train(self, mode: bool = True) -> VisionTower:
        """A frozen tower (no parameter requires grad) stays in eval mode. Batch norms always
        do: fine-tuning keeps the pretrained statistics (as CNN backbones are fine-tuned, and
        as a ViT, which has none, behaves); their scales and shifts still learn."""
        super().train(mode and any(p.requires_grad for p in self.parameters()))
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


def tower_resolution(what: str, native: int, image_size: int | None, patch: int | None) -> int:
    """The side a tower copy reads: ``image_size`` (None: ``native``). A ViT (``patch``, its
    patch size) takes any multiple of its patch; a tower without position embeddings to
    resize (``patch=None``) only its own side."""
    if image_size is None or image_size == native:
        return native
    if patch is None:
        raise PairfreeError(f"{what} reads {native}-px images only: it has no position "
                            f"embeddings to resize for {image_size} px")  # fmt: skip
    if image_size < patch or image_size % patch:
        raise PairfreeError(f"{what}: {image_size} px is not a multiple of its {patch}-px "
                            "patches")  # fmt: skip
    return image_size


def resize_positions(positions: torch.Tensor, side: int) -> torch.Tensor:
    """A ViT's position embeddings ``[1 + n*n, D]`` (the class token's first, then the n x n
    patch grid row by row) for a ``side`` x ``side`` grid: the class token's stays, the grid
    is resized as a D-channel image, bicubic without aligned corners (ICSD's, BLIP's way).
    Computed in float32, returned in the input's dtype."""
    n = math.isqrt(positions.shape[0] - 1)
    if positions.dim() != 2 or n * n + 1 != positions.shape[0]:
        raise ValueError(f"not a class token and a square grid: {tuple(positions.shape)}")
    if side == n:
        return positions.clone()
    grid = positions[1:].float().reshape(n, n, -1).permute(2, 0, 1).unsqueeze(0)
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
    grid = grid[0].permute(1, 2, 0).reshape(side * side, -1)
    return torch.cat((positions[:1], grid.to(positions.dtype)))


def eval_transform(spec: PixelSpec):
    """PIL image -> normalized ``[3, S, S]``: a bicubic resize to the square."""
    return transforms.Compose(
        [
            transforms.Resize((spec.image_size, spec.image_size), InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(spec.mean, spec.std),
        ]
    )


def train_transform(spec: PixelSpec, min_scale: float = 0.5, flip: bool = True):
    """PIL image -> normalized ``[3, S, S]``: a random crop of ``min_scale``-1 of the area
    resized to the square (bicubic), and a random horizontal flip."""
    steps = [
        transforms.RandomResizedCrop(
            spec.image_size, scale=(min_scale, 1.0), interpolation=InterpolationMode.BICUBIC
        )
    ]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)]
    return transforms.Compose(steps)


def augment(transform, image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` with its random draws taken from ``seed`` alone; the global RNG is
    left as it was (dropout and the data order draw from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transform(image.convert("RGB"))


def tower_pixels(spec: PixelSpec, images: Sequence[Image.Image]) -> torch.Tensor:
    """A batch of images through :func:`eval_transform`."""
    transform = eval_transform(spec)
    if not images:
        return torch.zeros(0, 3, spec.image_size, spec.image_size)
    return torch.stack([transform(image.convert("RGB")) for image in images])
