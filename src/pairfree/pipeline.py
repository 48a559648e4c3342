"""Images in, captions out: the inference pipeline behind ``pairfree caption``.

``Captioner.from_pretrained(path).caption(images)`` loads a captioner checkpoint, the CLIP
encoder it was trained with, and the way it expects its condition (normalized or not, a
modality offset, DeCap projection onto a text memory), then decodes with its generation
settings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from pairfree.captioner import PrefixCaptioner, load_captioner
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import load_image
from pairfree.errors import PairfreeError
from pairfree.features import FeatureStore
from pairfree.projection import project_to_memory


@dataclass
class GenerationConfig:
    num_beams: int = 5
    max_new_tokens: int = 67
    stop: str | None = "."  # decoding stops after this text (CapDec stops at ".")
    length_penalty: float = 1.0

    def stop_token_ids(self, tokenizer) -> list[int]:
        """The token that ends a caption at ``stop`` (its last token), if any."""
        if not self.stop:
            return []
        return tokenizer(self.stop, add_special_tokens=False)["input_ids"][-1:]


class Captioner:
    """A trained captioner with everything needed to caption raw images."""

    def __init__(
        self,
        model: PrefixCaptioner,
        tokenizer,
        clip: ClipEncoder,
        *,
        normalize: bool = True,
        offset: torch.Tensor | None = None,
        memory: torch.Tensor | None = None,
        tau: float = 0.01,
        generation: GenerationConfig | None = None,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.clip = clip
        self.normalize = normalize
        self.offset = offset
        self.memory = memory
        self.tau = tau
        self.generation = generation or GenerationConfig()

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
        model, tokenizer, extra = load_captioner(path, device=device)
        spec = clip if clip is not None else extra.get("clip")
        if spec is None:
            raise PairfreeError(f"{path} does not record its CLIP encoder; pass clip=...")
        encoder = load_clip(spec, device=device) if isinstance(spec, str) else spec
        condition = extra.get("condition", {})
        offset = condition.get("offset")
        saved = extra.get("generation", {})
        known = {f.name for f in fields(GenerationConfig)}
        unknown = set(generation) - known
        if unknown:
            raise PairfreeError(
                f"unknown generation options {sorted(unknown)}; known: {sorted(known)}"
            )
        gen = replace(
            GenerationConfig(**{k: v for k, v in saved.items() if k in known}), **generation
        )
        memory = None
        if project_to is not None:
            store = FeatureStore(project_to)
            if store.kind != "text":
                raise PairfreeError(
                    f"{project_to} holds {store.kind} features; projection needs text"
                )
            if store.encoder != encoder.name:
                raise PairfreeError(
                    f"{project_to} was encoded with {store.encoder}, the captioner uses {encoder.name}"
                )
            memory = store.tensor()
        return cls(
            model,
            tokenizer,
            encoder,
            normalize=condition.get("normalize", True),
            offset=torch.tensor(offset) if offset is not None else None,
            memory=memory,
            tau=tau,
            generation=gen,
        )

    def conditions(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Turn CLIP image embeddings into what the decoder was trained to read."""
        x = image_embeds.float()
        if self.normalize:
            x = F.normalize(x, dim=-1)
        if self.offset is not None:
            x = x + self.offset
            x = F.normalize(x, dim=-1) if self.normalize else x
        if self.memory is not None:
            x = project_to_memory(x, self.memory, self.tau)
        return x

    @torch.no_grad()
    def caption_embeddings(self, image_embeds: torch.Tensor, *, batch_size: int = 64) -> list[str]:
        """Captions for precomputed CLIP image embeddings (e.g. from a feature store)."""
        device = next(self.model.parameters()).device
        g = self.generation
        texts: list[str] = []
        for start in range(0, len(image_embeds), batch_size):
            cond = self.conditions(image_embeds[start : start + batch_size]).to(device)
            ids = self.model.generate(
                cond,
                num_beams=g.num_beams,
                max_new_tokens=g.max_new_tokens,
                stop_token_ids=self.generation.stop_token_ids(self.tokenizer),
                eos_token_id=self.tokenizer.eos_token_id,
                length_penalty=g.length_penalty,
            )
            texts += [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        return texts

    def caption(
        self, images: Sequence[Image.Image | str | Path], *, batch_size: int = 32
    ) -> list[str]:
        """Captions for PIL images or image files (a bad file raises BadInputError)."""
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        embeds = self.clip.encode_images(pil, batch_size=batch_size) if pil else torch.empty(0)
        return self.caption_embeddings(embeds, batch_size=batch_size)
