"""open_clip backend: ResNet CLIPs (CapDec's RN50x4), LAION and other open_clip models.

Model forms (after the ``open_clip:`` prefix):

- ``RN50x4/openai``, ``ViT-B-32/laion2b_s34b_b79k``: architecture / pretrained tag;
- ``RN50x4@/path/to/checkpoint.pt``: architecture + a local state dict (``.pt``/``.bin`` loaded
  with ``weights_only=True``, or ``.safetensors``);
- ``hf-hub:org/repo``, ``local-dir:/path``: open_clip's own schemas;
- ``RN50x4``: random initialization.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image

from pairfree.clip.batching import BatchedClipEncoder, fingerprint
from pairfree.clip.vision import (
    CLIP_MEAN,
    CLIP_STD,
    PixelSpec,
    VisionTower,
    resize_positions,
    tower_resolution,
)
from pairfree.errors import PairfreeError

try:
    import open_clip
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer
except ImportError as error:
    raise PairfreeError(
        "the open_clip CLIP backend needs open_clip_torch: pip install 'pairfree[open_clip]'"
    ) from error

_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_SCHEMAS = ("hf-hub:", "local-dir:")


class OpenClip(BatchedClipEncoder):
    """A frozen open_clip model with its eval preprocessing and tokenizer.

    Grid features come from the image tower's last block: for a ViT, its class token and
    patch tokens after ``ln_post``, before the projection (``[N, 1 + H*W, width]``); for a
    ModifiedResNet, the ``layer4`` feature map before the attention pool, flattened to
    ``[N, H*W, C]``.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        preprocess: Callable[[Image.Image], torch.Tensor],
        tokenizer: Callable[[list[str]], torch.Tensor],
        *,
        name: str,
        embed_dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.name = name
        self.embed_dim = embed_dim
        self.device = torch.device(device)
        self.dtype = dtype

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(tokens, width) of :meth:`encode_image_grid`."""
        visual = self.model.visual
        if isinstance(visual, VisionTransformer):
            return visual.grid_size[0] * visual.grid_size[1] + 1, visual.transformer.width
        if isinstance(visual, ModifiedResNet):
            return (visual.image_size // 32) ** 2, visual.attnpool.k_proj.in_features
        raise PairfreeError(
            f"{self.name}: grid features need a ViT or ModifiedResNet image tower, "
            f"not {type(visual).__name__}"
        )

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = torch.stack([self.preprocess(image) for image in images])
        return pixels.to(self.device, self.dtype)

    def _image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.encode_image(self._pixels(images))

    def _text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device))

    def _grid_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return OpenClipVisionTower.grid(self.model.visual, self._pixels(images))

    @property
    def grid_class_tokens(self) -> int:
        return 1 if isinstance(self.model.visual, VisionTransformer) else 0

    def _embed_grid_batch(self, grid: torch.Tensor) -> torch.Tensor:
        visual = self.model.visual
        grid = grid.to(self.device, self.dtype)
        if isinstance(visual, VisionTransformer) and visual.proj is not None:
            return grid @ visual.proj  # after ln_post already, as the grid is
        if isinstance(visual, ModifiedResNet):  # DenseCLIP: positioned, value, output
            pool = visual.attnpool
            return pool.c_proj(pool.v_proj(grid + pool.positional_embedding[1:].to(grid.dtype)))
        return super()._embed_grid_batch(grid)

    def _image_and_grid_batch(
        self, images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        embeds, grid = OpenClipVisionTower.features(
            self.model.visual, self._pixels(images), pooled=True
        )
        return embeds, grid

    def vision_tower(self, image_size: int | None = None) -> OpenClipVisionTower:
        visual = self.model.visual
        native = visual.image_size
        native = int(native[0] if isinstance(native, tuple | list) else native)
        vit = isinstance(visual, VisionTransformer)
        patch = visual.patch_size[0] if vit else None
        size = tower_resolution(self.name, native, image_size, patch)
        grid_shape = self.grid_shape
        visual = copy.deepcopy(visual)
        if size != native:
            side = size // patch
            positions = visual.positional_embedding
            visual.positional_embedding = torch.nn.Parameter(
                resize_positions(positions.detach(), side), requires_grad=positions.requires_grad
            )
            visual.image_size, visual.grid_size = (size, size), (side, side)
            grid_shape = (side * side + 1, grid_shape[1])
        spec = PixelSpec(
            size,
            tuple(getattr(visual, "image_mean", None) or CLIP_MEAN),
            tuple(getattr(visual, "image_std", None) or CLIP_STD),
        )
        return OpenClipVisionTower(visual, spec, grid_shape)


class OpenClipVisionTower(VisionTower):
    """An open_clip image tower giving :meth:`OpenClip.encode_image_grid`'s features; the
    pooling head the grid does not pass through stays frozen (it would get no gradient)."""

    def __init__(self, visual: torch.nn.Module, pixels: PixelSpec, grid_shape: tuple[int, int]):
        super().__init__()
        self.visual = visual.requires_grad_(True).train()
        for name in ("proj", "attn_pool", "attnpool"):
            head = getattr(visual, name, None)
            if head is not None:
                head.requires_grad_(False)
        self.pixels, self.grid_shape = pixels, grid_shape

    @staticmethod
    def grid(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return OpenClipVisionTower.features(visual, pixels, pooled=False)[1]

    @staticmethod
    def features(
        visual: torch.nn.Module, pixels: torch.Tensor, *, pooled: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The tower's output (``encode_image``'s, with ``pooled``, else None) and the grid
        features, from one pass."""
        if not isinstance(visual, VisionTransformer):  # the feature map before attention pooling
            out = visual.forward_intermediates(pixels, indices=1, intermediates_only=not pooled)
            return out.get("image_features"), out["image_intermediates"][0].flatten(2).transpose(
                1, 2
            )
        out = visual.forward_intermediates(
            pixels,
            indices=1,
            normalize_intermediates=True,
            intermediates_only=not pooled,
            output_fmt="NLC",
            output_extra_tokens=True,
        )
        # the class token first, then the patches, all after ln_post (before the projection)
        grid = torch.cat((out["image_intermediates_prefix"][0], out["image_intermediates"][0]), 1)
        return out.get("image_features"), grid

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.grid(self.visual, pixels)


def _parse(model: str) -> tuple[str, str | None, bool]:
    """Split a model form into open_clip's (model_name, pretrained) and whether that is a file."""
    if model.startswith(_SCHEMAS):
        return model, None, False
    from_file = "@" in model
    name, _, pretrained = model.partition("@" if from_file else "/")
    if open_clip.get_model_config(name) is None:
        raise PairfreeError(
            f"unknown open_clip model {name!r} (open_clip.list_models() names the known ones)"
        )
    if from_file and not Path(pretrained).is_file():
        raise PairfreeError(f"open_clip checkpoint not found: {pretrained}")
    if not from_file and pretrained:
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise PairfreeError(
                f"unknown pretrained tag {pretrained!r} for open_clip model {name!r}; "
                f"known tags: {', '.join(tags) or 'none'}"
            )
    return name, pretrained or None, from_file


def load_open_clip(
    model: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> OpenClip:
    """Build ``model`` (see the module docstring) with open_clip's own factory."""
    if dtype not in _PRECISION:
        raise PairfreeError(f"open_clip backend supports dtypes {list(_PRECISION)}, not {dtype}")
    name, pretrained, from_file = _parse(model)
    try:
        clip, _, preprocess = open_clip.create_model_and_transforms(
            name,
            pretrained=pretrained,
            precision=_PRECISION[dtype],
            device=device,
            weights_only=True,
        )
    except (RuntimeError, pickle.UnpicklingError) as error:
        if from_file:
            raise PairfreeError(
                f"{pretrained}: not loadable as open_clip {name!r} weights: {error}"
            ) from error
        raise
    return OpenClip(
        clip,
        preprocess,
        open_clip.get_tokenizer(name),
        name=f"open_clip:{model}#{fingerprint(clip, repr(preprocess))}",
        embed_dim=open_clip.get_model_config(name)["embed_dim"],
        device=device,
        dtype=dtype,
    )
