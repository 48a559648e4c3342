"""Images in, captions out: the inference pipeline behind ``pairfree caption``.

``Captioner.from_pretrained(path).caption(images)`` loads a captioner checkpoint, the CLIP
encoder named on its card, and the conditioning it was trained for (normalized or not, a
modality offset, DeCap projection onto a text memory, a hard-prompt vocabulary), then decodes
with its generation settings. Prefix (ClipCap) and cross-attention (SaCap) captioners load and
caption alike; the latter also read the images' CLIP grid features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields, replace
from pathlib import Path

import torch
from PIL import Image

from pairfree.captioner import (
    Conditioning,
    GenerationConfig,
    PrefixCaptioner,
    condition,
    load_captioner,
)
from pairfree.captioner.checkpoint import read_card
from pairfree.captioner.cross_attention import CrossAttentionCaptioner, pad_prompts
from pairfree.captioner.prompts import hard_prompt, top_phrases
from pairfree.clip import ClipEncoder, load_clip
from pairfree.clip.vision import tower_pixels
from pairfree.data import load_image
from pairfree.errors import PairfreeError
from pairfree.features import FeatureStore


class Captioner:
    """A trained captioner with everything needed to caption raw images."""

    def __init__(
        self,
        model: PrefixCaptioner | CrossAttentionCaptioner,
        tokenizer,
        clip: ClipEncoder,
        *,
        conditioning: Conditioning | None = None,
        generation: GenerationConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.clip = clip
        self.conditioning = conditioning or Conditioning()
        self.generation = generation or GenerationConfig()
        spec = self.conditioning
        self.memory = (
            None if spec.project_to is None else _text_store(spec.project_to, clip).tensor()
        )
        self.phrases: tuple[list[str], torch.Tensor] | None = None
        if spec.prompt_phrases is not None:
            store = _text_store(spec.prompt_phrases, clip)
            self.phrases = (store.texts or [], store.tensor())
        if self.phrases is not None and not isinstance(model, CrossAttentionCaptioner):
            raise PairfreeError("hard-prompt phrases go with cross-attention captioners only")

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        clip: str | ClipEncoder | None = None,
        project_to: str | Path | None = None,
        tau: float = 0.01,
        device: str = "cpu",
        **generation: object,
    ) -> Captioner:
        """Load ``path``; ``project_to`` is a text feature store used as DeCap memory.

        ``generation`` overrides the checkpoint's decoding settings (``num_beams=1``...).
        """
        spec = clip if clip is not None else read_card(path).clip
        encoder = load_clip(spec, device=device) if isinstance(spec, str) else spec
        model, tokenizer, card = load_captioner(path, device=device, clip=encoder)
        known = {f.name for f in fields(GenerationConfig)}
        unknown = set(generation) - known
        if unknown:
            raise PairfreeError(
                f"unknown generation options {sorted(unknown)}; known: {sorted(known)}"
            )
        conditioning = card.conditioning
        if project_to is not None:
            conditioning = replace(conditioning, project_to=str(project_to), tau=tau)
        return cls(
            model,
            tokenizer,
            encoder,
            conditioning=conditioning,
            generation=replace(card.generation, **generation),
        )

    def conditions(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Turn CLIP image embeddings into what the decoder was trained to read."""
        return condition(
            image_embeds.float(), self.conditioning, training=False, memory=self.memory
        )

    @property
    def needs_grid(self) -> bool:
        """Whether captioning reads grid features besides the image embeddings."""
        return isinstance(self.model, CrossAttentionCaptioner)

    def grids(self, images: Sequence[Image.Image], *, batch_size: int = 64) -> torch.Tensor:
        """What the decoder cross-attends to: the CLIP grid features, or, for a captioner with
        its own (fine-tuned) image tower, its pixels (the tower runs inside the decoder)."""
        vision = getattr(self.model, "vision", None)
        if vision is None:
            return self.clip.encode_image_grid(images, batch_size=batch_size)
        return tower_pixels(vision.pixels, images)

    def hard_prompts(self, image_embeds: torch.Tensor) -> list[str]:
        """Each image's hard prompt (empty without a phrase vocabulary)."""
        if self.phrases is None:
            return [""] * len(image_embeds)
        texts, embeds = self.phrases
        chosen = top_phrases(image_embeds, embeds, texts, self.conditioning.prompt_topk)
        return [hard_prompt(p) for p in chosen]

    @torch.no_grad()
    def caption_embeddings(
        self,
        image_embeds: torch.Tensor,
        *,
        grid: torch.Tensor | None = None,
        batch_size: int = 64,
    ) -> list[str]:
        """Captions for precomputed CLIP image embeddings (e.g. from a feature store), and
        for a cross-attention captioner what :meth:`grids` gives for the images."""
        if self.needs_grid and (grid is None or len(grid) != len(image_embeds)):
            raise PairfreeError("a cross-attention captioner needs each image's grid features")
        device = next(self.model.parameters()).device
        settings = self.generation.generate_kwargs(self.tokenizer)
        texts: list[str] = []
        for start in range(0, len(image_embeds), batch_size):
            chunk = image_embeds[start : start + batch_size]
            cond = self.conditions(chunk).to(device)
            if self.needs_grid:
                ids = self._generate_cross_attention(cond, chunk, grid[start : start + batch_size],
                                                     settings)  # fmt: skip
            else:
                ids = self.model.generate(cond, **settings)
            texts += [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        return texts

    def _generate_cross_attention(
        self, cond: torch.Tensor, image_embeds: torch.Tensor, grid: torch.Tensor, settings: dict
    ) -> list[list[int]]:
        texts = self.hard_prompts(image_embeds)
        tokens = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        pad = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
        ids, mask = pad_prompts(tokens, pad_id=pad, max_tokens=self.model.config.max_prompt_tokens)
        soft = cond if self.model.soft_prompt is not None else None
        return self.model.generate(soft, grid, ids, mask, **settings)

    def caption(
        self, images: Sequence[Image.Image | str | Path], *, batch_size: int = 32
    ) -> list[str]:
        """Captions for PIL images or image files (a bad file raises BadInputError)."""
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        embeds = self.clip.encode_images(pil, batch_size=batch_size) if pil else torch.empty(0)
        grid = self.grids(pil, batch_size=batch_size) if self.needs_grid else None
        return self.caption_embeddings(embeds, grid=grid, batch_size=batch_size)


def _text_store(path: str, clip: ClipEncoder) -> FeatureStore:
    """A text feature store the conditioning reads (projection memory, prompt phrases),
    checked to match the CLIP in use."""
    store = FeatureStore(path)
    if store.kind != "text":
        raise PairfreeError(f"{path} holds {store.kind} features; the conditioning needs text")
    if store.encoder != clip.name:
        raise PairfreeError(
            f"{path} was encoded with {store.encoder}, the captioner uses {clip.name}"
        )
    return store
