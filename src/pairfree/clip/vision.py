"""A CLIP image tower as a trainable module, and the pixel transforms that feed it.

Recipes that fine-tune the image encoder (ICSD) take a copy of a CLIP backend's tower
(``ClipEncoder.vision_tower()``) into their captioner: ``tower(pixels)`` gives the same grid
features as the frozen ``encode_image_grid`` (a ViT's CLS and patch tokens after its final
norm; a CNN's last feature map), but with gradients, on pixels the recipe prepared.

Pixels come from two transforms, ICSD's (BLIP's): for training a random crop of 50-100 % of
the image resized to the tower's resolution (bicubic) and a random horizontal flip; for
evaluation a plain resize to that square (bicubic). Both normalize with the tower's own
mean and std. A training image's crop and flip are drawn from a generator seeded by (seed,
epoch, example), so they are the same on any number of processes and after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import nn
from torchvision import transforms
from torchvision.transforms import InterpolationMode

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
