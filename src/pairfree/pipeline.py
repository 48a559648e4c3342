"""Images in, captions out: the inference pipeline behind ``pairfree caption``.

``Captioner.from_pretrained(path).caption(images)`` loads a captioner checkpoint, the CLIP
encoder named on its card, and the conditioning it was trained for (normalized or not, a
modality offset, DeCap projection onto a text memory), then decodes with its generation
settings.
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
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import load_image
from pairfree.errors import PairfreeError
from pairfree.features import FeatureStore


class Captioner:
    """A trained captioner with everything needed to caption raw images."""

    def __init__(
        self,
        model: PrefixCaptioner,
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
        self.memory = _projection_memory(self.conditioning, clip)

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
        model, tokenizer, card = load_captioner(path, device=device)
        spec = clip if clip is not None else card.clip
        encoder = load_clip(spec, device=device) if isinstance(spec, str) else spec
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

    @torch.no_grad()
    def caption_embeddings(self, image_embeds: torch.Tensor, *, batch_size: int = 64) -> list[str]:
        """Captions for precomputed CLIP image embeddings (e.g. from a feature store)."""
        device = next(self.model.parameters()).device
        settings = self.generation.generate_kwargs(self.tokenizer)
        texts: list[str] = []
        for start in range(0, len(image_embeds), batch_size):
            cond = self.conditions(image_embeds[start : start + batch_size]).to(device)
            ids = self.model.generate(cond, **settings)
            texts += [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        return texts

    def caption(
        self, images: Sequence[Image.Image | str | Path], *, batch_size: int = 32
    ) -> list[str]:
        """Captions for PIL images or image files (a bad file raises BadInputError)."""
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        embeds = self.clip.encode_images(pil, batch_size=batch_size) if pil else torch.empty(0)
        return self.caption_embeddings(embeds, batch_size=batch_size)


def _projection_memory(conditioning: Conditioning, clip: ClipEncoder) -> torch.Tensor | None:
    """The DeCap memory the conditioning projects onto, checked to match the CLIP in use."""
    if conditioning.project_to is None:
        return None
    store = FeatureStore(conditioning.project_to)
    if store.kind != "text":
        raise PairfreeError(
            f"{conditioning.project_to} holds {store.kind} features; projection needs text"
        )
    if store.encoder != clip.name:
        raise PairfreeError(
            f"{conditioning.project_to} was encoded with {store.encoder}, "
            f"the captioner uses {clip.name}"
        )
    return store.tensor()
