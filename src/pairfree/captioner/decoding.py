"""Captioning with a captioner in memory: CLIP reads the images, the conditioning turns their
embeddings into what the decoder was trained on (normalized, offset, projected onto a text
memory, hard prompts from a phrase vocabulary, an entity classifier or entity filtering,
the embeddings of retrieved captions), and the generation settings decode.

:class:`CaptionDecoder` is what training validates with; :class:`pairfree.pipeline.Captioner`
adds loading, saving and sharing a checkpoint around it.
"""

from __future__ import annotations

import io
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image

from pairfree.captioner.conditioning import Conditioning, condition
from pairfree.captioner.cross_attention import CrossAttentionCaptioner, pad_prompts
from pairfree.captioner.entities import (
    EntityVocabulary,
    classify_entities,
    entity_prompt,
    frequent_entities,
)
from pairfree.captioner.generation import GenerationConfig
from pairfree.captioner.model import PrefixCaptioner
from pairfree.captioner.pcm import PCMCaptioner, grid_inputs
from pairfree.captioner.prompts import hard_prompt, top_phrases
from pairfree.clip import ClipEncoder, load_clip
from pairfree.clip.vision import tower_pixels
from pairfree.data import load_image
from pairfree.errors import BadInputError, PairfreeError, first_line
from pairfree.features import FeatureStore
from pairfree.retrieval import CaptionIndex

ImageInput = Union[Image.Image, str, Path, np.ndarray]  # noqa: UP007 (a runtime alias)


class CaptionDecoder:
    """A captioner, its tokenizer, CLIP, conditioning and decoding settings: images in,
    captions out."""

    def __init__(
        self,
        model: PrefixCaptioner | CrossAttentionCaptioner | PCMCaptioner,
        tokenizer,
        clip: ClipEncoder,
        *,
        conditioning: Conditioning | None = None,
        generation: GenerationConfig | None = None,
        retrieval_clip: ClipEncoder | None = None,
    ) -> None:
        """``retrieval_clip``: the encoder the conditioning's ``retrieval_clip`` names, if
        already loaded (else it is loaded here)."""
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
        self.entity_classes: tuple[list[str], torch.Tensor] | None = None
        if spec.entity_classes is not None:
            if not isinstance(model, PrefixCaptioner):
                raise PairfreeError("entity hard prompts go with prefix captioners only")
            store = _text_store(spec.entity_classes, clip)
            self.entity_classes = (store.texts or [], store.tensor())
        self.retrieval: tuple[list[str], torch.Tensor, CaptionIndex] | None = None
        self.retrieval_clip: ClipEncoder | None = None
        if spec.retrieval_memory is not None:
            store = _text_store(spec.retrieval_memory, clip)
            captions, keys = store.tensor(), None
            if spec.retrieval_clip is not None:
                self.retrieval_clip = retrieval_clip or load_clip(
                    spec.retrieval_clip, device=next(model.parameters()).device
                )
                keys = _text_store(spec.retrieval_keys, self.retrieval_clip)
                if keys.texts != store.texts:
                    raise PairfreeError(f"{spec.retrieval_keys} does not hold the captions of "
                                        f"{spec.retrieval_memory} in their order")  # fmt: skip
            index = CaptionIndex(captions if keys is None else keys.tensor())
            self.retrieval = (store.texts or [], captions, index)
        fusion = getattr(model.config, "mapper", None) == "fusion"
        if fusion and self.retrieval is None:
            raise PairfreeError("a fusion mapper reads retrieved captions: the conditioning "
                                "names no retrieval_memory")  # fmt: skip
        self.entity_words = (
            EntityVocabulary(spec.entity_words) if spec.entity_min_count > 0 else None
        )
        if self.entity_words is not None and not isinstance(model, PrefixCaptioner):
            raise PairfreeError("entity hard prompts go with prefix captioners only")

    def conditions(
        self, image_embeds: torch.Tensor, nearest: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Turn CLIP image embeddings into what the decoder was trained to read ([B, d]; for
        a fusion mapper [B, 1 + k, d], the k nearest captions' embeddings after it;
        ``nearest``: :meth:`retrieve`'s answer for these images, needed where a second CLIP
        retrieves)."""
        cond = condition(
            image_embeds.float(), self.conditioning, training=False, memory=self.memory
        )
        if getattr(self.model.config, "mapper", None) != "fusion":
            return cond
        _, captions, _ = self.retrieval
        k = self.conditioning.retrieval_k
        nearest = (self.retrieve(image_embeds, k) if nearest is None else nearest)[:, :k]
        return torch.cat((cond[:, None], captions[nearest].to(cond.device, cond.dtype)), dim=1)

    def retrieve(
        self,
        image_embeds: torch.Tensor,
        k: int | None = None,
        *,
        retrieval_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """[B, k] indices of each image's k nearest captions in the retrieval memory, nearest
        first (default k: as many as the fusion mapper and entity filtering read). Where a
        second CLIP retrieves (:attr:`retrieval_clip`), it searches with that CLIP's image
        embeddings, ``retrieval_embeds`` (:meth:`retrieval_inputs`)."""
        _, captions, index = self.retrieval
        spec = self.conditioning
        k = max(spec.retrieval_k, spec.retrieval_captions) if k is None else k
        query = image_embeds
        if self.retrieval_clip is not None:
            if retrieval_embeds is None or len(retrieval_embeds) != len(image_embeds):
                raise PairfreeError(f"this captioner retrieves captions with "
                                    f"{spec.retrieval_clip}: pass each image's retrieval_embeds "
                                    "(its image embeddings under that CLIP)")  # fmt: skip
            query = retrieval_embeds
        return index.search(query.float().cpu(), min(k, len(captions)))

    def retrieval_inputs(
        self, images: Sequence[Image.Image], *, batch_size: int = 64
    ) -> torch.Tensor | None:
        """The images' embeddings under the second CLIP that retrieves captions (None where
        the captioner's own CLIP retrieves, or nothing does)."""
        if self.retrieval_clip is None:
            return None
        return self.retrieval_clip.encode_images(images, batch_size=batch_size)

    @property
    def needs_embeddings(self) -> bool:
        """Whether captioning reads the images' CLIP embeddings: a prefix captioner always, a
        cross-attention one only for a soft prompt or hard prompts (ICSD's reads neither),
        PCM-Net's always."""
        if not isinstance(self.model, CrossAttentionCaptioner):
            return True
        return self.model.soft_prompt is not None or self.phrases is not None

    @property
    def needs_grid(self) -> bool:
        """Whether captioning reads grid features besides the image embeddings."""
        return isinstance(self.model, CrossAttentionCaptioner | PCMCaptioner)

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

    @property
    def entity_prompted(self) -> bool:
        """Whether a prefix captioner reads an entity hard prompt after its soft prompt."""
        return self.entity_classes is not None or self.entity_words is not None

    def entities(
        self, image_embeds: torch.Tensor, nearest: torch.Tensor | None = None
    ) -> list[list[str]]:
        """Each image's entities: by entity filtering of its retrieved captions (``nearest``
        as in :meth:`conditions`), else by the zero-shot classifier (none without either)."""
        if self.entity_words is not None:
            texts, _, _ = self.retrieval
            many = self.conditioning.retrieval_captions
            nearest = (self.retrieve(image_embeds, many) if nearest is None else nearest)[:, :many]
            min_count = self.conditioning.entity_min_count
            return [frequent_entities([texts[i] for i in row], self.entity_words, min_count)
                    for row in nearest.tolist()]  # fmt: skip
        if self.entity_classes is None:
            return [[] for _ in image_embeds]
        classes, embeds = self.entity_classes
        spec = self.conditioning
        return classify_entities(image_embeds, embeds, classes, top_k=spec.entity_topk,
                                 threshold=spec.entity_threshold,
                                 temperature=spec.entity_temperature)  # fmt: skip

    @torch.no_grad()
    def caption_embeddings(
        self,
        image_embeds: torch.Tensor,
        *,
        grid: torch.Tensor | None = None,
        retrieval_embeds: torch.Tensor | None = None,
        batch_size: int = 64,
    ) -> list[str]:
        """Captions for precomputed CLIP image embeddings (e.g. from a feature store), and
        for a cross-attention captioner what :meth:`grids` gives for the images (for one that
        retrieves with a second CLIP, what :meth:`retrieval_inputs` gives). Where
        :attr:`needs_embeddings` is false, ``image_embeds`` only counts the images (``[N, 0]``
        will do)."""
        if self.needs_grid and (grid is None or len(grid) != len(image_embeds)):
            raise PairfreeError("a cross-attention captioner needs each image's grid features")
        device = next(self.model.parameters()).device
        settings = self.generation.generate_kwargs(self.tokenizer)
        texts: list[str] = []
        for start in range(0, len(image_embeds), batch_size):
            chunk = image_embeds[start : start + batch_size]
            nearest = None  # retrieved once per batch, for the fusion mapper and the entities
            if self.retrieval is not None:
                keys = None if retrieval_embeds is None else retrieval_embeds[start:][:batch_size]
                nearest = self.retrieve(chunk, retrieval_embeds=keys)
            cond = self.conditions(chunk, nearest).to(device) if self.needs_embeddings else None
            if isinstance(self.model, PCMCaptioner):  # its mix-up reads the grid's embeddings
                rows, dense = grid_inputs(grid[start : start + batch_size], self.clip.embed_grid,
                                          self.model.config)  # fmt: skip
                ids = self.model.generate(chunk, cond, rows, dense, **settings)
            elif self.needs_grid:
                ids = self._generate_cross_attention(cond, chunk, grid[start : start + batch_size],
                                                     settings)  # fmt: skip
            elif self.entity_prompted:
                prompts = [entity_prompt(e) for e in self.entities(chunk, nearest)]
                tokens = self.tokenizer(prompts, add_special_tokens=False)["input_ids"]
                ids, mask = pad_prompts(tokens, pad_id=0)
                ids = self.model.generate(cond, ids, mask, **settings)
            else:
                ids = self.model.generate(cond, **settings)
            texts += [self.tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
        return texts

    def _generate_cross_attention(
        self,
        cond: torch.Tensor | None,
        image_embeds: torch.Tensor,
        grid: torch.Tensor,
        settings: dict,
    ) -> list[list[int]]:
        texts = self.hard_prompts(image_embeds)
        tokens = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        pad = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id or 0
        ids, mask = pad_prompts(tokens, pad_id=pad, max_tokens=self.model.config.max_prompt_tokens)
        soft = cond if self.model.soft_prompt is not None else None
        counted = self.model.original_prompt_length(hard_prompt=self.phrases is not None)
        return self.model.generate(soft, grid, ids, mask, prompt_lengths=[counted] * len(ids),
                                   **settings)  # fmt: skip

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 32
    ) -> str | list[str]:
        return self.caption(images, batch_size=batch_size)

    def caption(
        self, images: ImageInput | Sequence[ImageInput], *, batch_size: int = 32
    ) -> str | list[str]:
        """The caption of one image (a path, a URL, a PIL image, an ``[H, W, 3]`` array), or
        the captions of a list of them (or of an ``[N, H, W, 3]`` array); a bad image raises
        BadInputError naming it."""
        single = not isinstance(images, list | tuple) and not (
            isinstance(images, np.ndarray) and images.ndim == 4
        )
        pil = [as_image(im) for im in ([images] if single else images)]
        texts = self._caption(pil, batch_size=batch_size)
        return texts[0] if single else texts

    def _caption(self, pil: list[Image.Image], *, batch_size: int) -> list[str]:
        embeds, grid = self.image_inputs(pil, batch_size=batch_size)
        keys = self.retrieval_inputs(pil, batch_size=batch_size)
        return self.caption_embeddings(embeds, grid=grid, retrieval_embeds=keys,
                                       batch_size=batch_size)  # fmt: skip

    def image_inputs(
        self, images: Sequence[Image.Image], *, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What :meth:`caption_embeddings` reads of the images: their CLIP embeddings
        (``[N, 0]`` where :attr:`needs_embeddings` is false) and :meth:`grids` (None where
        :attr:`needs_grid` is), both from one pass through CLIP's image tower when both
        come from it."""
        from_clip = getattr(self.model, "vision", None) is None
        if self.needs_embeddings and self.needs_grid and from_clip:
            return self.clip.encode_images_and_grid(images, batch_size=batch_size)
        if images and self.needs_embeddings:
            embeds = self.clip.encode_images(images, batch_size=batch_size)
        else:
            embeds = torch.empty(len(images), 0)
        grid = self.grids(images, batch_size=batch_size) if self.needs_grid else None
        return embeds, grid


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


def as_image(image: ImageInput) -> Image.Image:
    """An RGB PIL image from a PIL image, an image file, an http(s) URL or a numpy array
    (``[H, W]`` or ``[H, W, 3|4]``; uint8, or floats in 0-1)."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = image
        if array.dtype != np.uint8:
            if not np.issubdtype(array.dtype, np.floating):
                raise PairfreeError(f"an image array must be uint8 or float, not {array.dtype}")
            array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
            raise PairfreeError(f"an image array must be [H, W] or [H, W, 3], got {array.shape}")
        return Image.fromarray(array.squeeze(2) if array.ndim == 3 and array.shape[2] == 1
                               else array).convert("RGB")  # fmt: skip
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(image, timeout=30) as response:
                data = response.read()
            with Image.open(io.BytesIO(data)) as opened:
                return opened.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise BadInputError(
                image, f"cannot fetch or decode the image: {first_line(err)}"
            ) from err
    if isinstance(image, str | Path):
        return load_image(image)
    raise PairfreeError(f"not an image: {type(image).__name__} (a path, URL, PIL image or array)")
