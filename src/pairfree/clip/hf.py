"""Hugging Face ``transformers`` CLIP backend (OpenAI ViT-B/32, B/16, L/14 and compatible)."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from PIL import Image
from transformers import AutoProcessor, CLIPModel, ProcessorMixin

from pairfree.clip.batching import BatchedClipEncoder, fingerprint
from pairfree.clip.vision import PixelSpec, VisionTower, resize_positions, tower_resolution


class HFClip(BatchedClipEncoder):
    """A frozen ``CLIPModel`` with the checkpoint's own processor.

    Grid features are the vision tower's last-layer tokens, CLS first, after its
    ``post_layernorm`` and before the projection: ``[N, 50, 768]`` for ViT-B/32, what SaCap's
    decoder cross-attends to and what open_clip's ViTs give.
    """

    def __init__(self, model: CLIPModel, processor: ProcessorMixin, *, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.name = name
        self.embed_dim: int = model.config.projection_dim
        self.max_length: int = model.config.text_config.max_position_embeddings
        vision = model.config.vision_config
        # CLS and patch tokens, as SaCap's decoders cross-attend to
        self.grid_shape = ((vision.image_size // vision.patch_size) ** 2 + 1, vision.hidden_size)
        self.grid_class_tokens = 1

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        pixels = self.processor.image_processor(images=list(images), return_tensors="pt")
        return pixels["pixel_values"].to(self.model.device, self.model.dtype)

    def _image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=self._pixels(images)).pooler_output

    def _text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.processor.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.model.device)
        return self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
        ).pooler_output

    def _grid_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return HFVisionTower.grid(self.model.vision_model, self._pixels(images))

    def _embed_grid_batch(self, grid: torch.Tensor) -> torch.Tensor:
        # the grid is past post_layernorm already: the projection is the rest of the head
        return self.model.visual_projection(grid.to(self.model.device, self.model.dtype))

    def _image_and_grid_batch(
        self, images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # get_image_features projects the pooler output, post_layernorm of the class token,
        # which is the grid's first token
        grid = self._grid_batch(images)
        return self.model.visual_projection(grid[:, 0]), grid

    def vision_tower(self, image_size: int | None = None) -> HFVisionTower:
        config = self.model.config.vision_config
        size = tower_resolution(self.name, config.image_size, image_size, config.patch_size)
        vision = copy.deepcopy(self.model.vision_model)
        if size != config.image_size:
            resize_vision(vision, size)
        processor = self.processor.image_processor
        spec = PixelSpec(size, tuple(processor.image_mean), tuple(processor.image_std))
        grid = ((size // config.patch_size) ** 2 + 1, config.hidden_size)
        return HFVisionTower(vision, spec, grid)


def resize_vision(vision: torch.nn.Module, image_size: int) -> None:
    """Make a ``CLIPVisionTransformer`` read ``image_size``-px images: its position embeddings
    resized (:func:`~pairfree.clip.vision.resize_positions`) into a new, trainable table."""
    embeddings = vision.embeddings
    side = image_size // embeddings.patch_size
    weight = resize_positions(embeddings.position_embedding.weight.detach(), side)
    embeddings.position_embedding = torch.nn.Embedding.from_pretrained(weight, freeze=False)
    embeddings.image_size = embeddings.config.image_size = image_size
    embeddings.num_patches, embeddings.num_positions = side * side, side * side + 1
    embeddings.position_ids = torch.arange(side * side + 1, device=weight.device).unsqueeze(0)


class HFVisionTower(VisionTower):
    """A ``CLIPVisionTransformer`` giving its last-layer tokens after ``post_layernorm``."""

    def __init__(self, vision: torch.nn.Module, pixels: PixelSpec, grid_shape: tuple[int, int]):
        super().__init__()
        self.vision = vision.requires_grad_(True).train()
        self.pixels, self.grid_shape = pixels, grid_shape

    @staticmethod
    def grid(vision: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        return vision.post_layernorm(vision(pixel_values=pixels).last_hidden_state)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.grid(self.vision, pixels)


def load_hf_clip(
    model: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> HFClip:
    """Load ``model`` (a hub id or a local directory) with ``from_pretrained``; its name
    carries a fingerprint of the weights and the image preprocessing."""
    clip = CLIPModel.from_pretrained(model, dtype=dtype).to(device)
    processor = AutoProcessor.from_pretrained(model)
    digest = fingerprint(clip, processor.image_processor.to_json_string())
    return HFClip(clip, processor, name=f"hf:{model}#{digest}")
