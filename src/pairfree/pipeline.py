"""Images in, captions out: the inference pipeline behind ``pairfree caption``.

``Captioner.from_pretrained(ref)`` loads a captioner checkpoint (a directory, a training run's
folder, or a Hugging Face Hub repo id), the CLIP encoder named on its card, and the
conditioning it was trained for (normalized or not, a modality offset, DeCap projection onto
a text memory, a hard-prompt vocabulary, an entity classifier); ``captioner(images)`` then
decodes with its generation settings: one image (a path, a URL, a PIL image, a numpy array)
gives one caption, a list gives a list. Prefix (ClipCap, CapDec, ViECap, IFCap) and cross-attention
(SaCap, ICSD) captioners load and caption alike. ``save_pretrained`` writes a self-contained copy (the feature stores its
conditioning reads included, and a model card); ``push_to_hub`` uploads one.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import fields, replace
from pathlib import Path

import torch

from pairfree.captioner import (
    Conditioning,
    GenerationConfig,
    PrefixCaptioner,
    load_captioner,
)
from pairfree.captioner.card import CheckpointCard
from pairfree.captioner.checkpoint import (
    STORE_FOLDERS,
    card_path,
    check_clip_spec,
    family_of,
    read_card,
    save_captioner,
)
from pairfree.captioner.cross_attention import CrossAttentionCaptioner
from pairfree.captioner.decoding import CaptionDecoder
from pairfree.captioner.pcm import PCMCaptioner
from pairfree.clip import ClipEncoder, load_clip
from pairfree.errors import PairfreeError
from pairfree.hub import TRAINING_NAME, model_card, push_folder, resolve_checkpoint, training_record
from pairfree.io import atomic_write_json, atomic_write_text
from pairfree.job import resolve_device

# conditioning fields that name feature stores, and their folder in a saved checkpoint
STORES = dict(zip(("project_to", "prompt_phrases", "entity_classes", "retrieval_memory",
                   "retrieval_keys"), STORE_FOLDERS, strict=True))  # fmt: skip
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Captioner(CaptionDecoder):
    """A trained captioner with everything needed to caption raw images, and to load, save and
    share it."""

    def __init__(
        self,
        model: PrefixCaptioner | CrossAttentionCaptioner | PCMCaptioner,
        tokenizer,
        clip: ClipEncoder,
        *,
        conditioning: Conditioning | None = None,
        generation: GenerationConfig | None = None,
        card: CheckpointCard | None = None,
        source: Path | None = None,
        retrieval_clip: ClipEncoder | None = None,
    ) -> None:
        super().__init__(model, tokenizer, clip, conditioning=conditioning, generation=generation,
                         retrieval_clip=retrieval_clip)  # fmt: skip
        self.card = card  # what it was loaded with (recipe, CLIP spec): needed to save it
        self.source = source  # the checkpoint directory it was loaded from

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        clip: str | ClipEncoder | None = None,
        project_to: str | Path | None = None,
        tau: float = 0.01,
        device: str = "auto",
        dtype: str | torch.dtype | None = None,
        revision: str | None = None,
        **generation: object,
    ) -> Captioner:
        """Load a checkpoint directory, a training run's folder (its ``best/``, else
        ``last/``) or a Hub repo id (``revision``: a branch, tag or commit); ``project_to`` is
        a text feature store used as DeCap memory.

        ``device``: ``"auto"`` is the GPU when there is one; ``dtype`` (``"float16"``,
        ``"bfloat16"``) runs the decoder and CLIP in half precision. ``generation`` overrides the
        checkpoint's decoding settings (``num_beams=1``...).
        """
        device = resolve_device(device)
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise PairfreeError(f"unknown dtype {dtype!r}: one of {sorted(DTYPES)}")
        half = DTYPES[dtype] if isinstance(dtype, str) else (dtype or torch.float32)
        path = resolve_checkpoint(path, revision=revision)
        if clip is None:
            clip = read_card(path).clip  # the folder's files are checked before anything loads
            check_clip_spec(path, clip)
        spec = clip
        encoder = load_clip(spec, device=device, dtype=half) if isinstance(spec, str) else spec
        model, tokenizer, card = load_captioner(path, device=device, clip=encoder)
        model = model.to(half)
        known = {f.name for f in fields(GenerationConfig)}
        unknown = set(generation) - known
        if unknown:
            raise PairfreeError(
                f"unknown generation options {sorted(unknown)}; known: {sorted(known)}"
            )
        # a saved copy names its own stores relative to itself (and never out of itself)
        conditioning = replace(card.conditioning, **{
            field: card_path(path, value, f"conditioning.{field}") for field in STORES
            if (value := getattr(card.conditioning, field))
        })  # fmt: skip
        if project_to is not None:
            conditioning = replace(conditioning, project_to=str(project_to), tau=tau)
        retrieval_clip = None
        if conditioning.retrieval_clip is not None:  # IFCap's second CLIP, as the card names
            check_clip_spec(path, conditioning.retrieval_clip)
            retrieval_clip = load_clip(conditioning.retrieval_clip, device=device, dtype=half)
        return cls(
            model,
            tokenizer,
            encoder,
            conditioning=conditioning,
            generation=replace(card.generation, **generation),
            card=card,
            source=path,
            retrieval_clip=retrieval_clip,
        )

    def save_pretrained(self, out_dir: str | Path, *, repo_id: str | None = None) -> Path:
        """Write a self-contained copy to ``out_dir`` (atomically): the checkpoint, the feature
        stores its conditioning reads (as ``memory/``, ``phrases/``, ``entities/``,
        ``retrieval/``, ``retrieval-keys/``), what its training run recorded
        (``training.json``) and a model card (``README.md``; ``repo_id`` goes into its loading
        example)."""
        if self.card is None:
            raise PairfreeError("only a captioner loaded with from_pretrained can be saved (its "
                                "card names the recipe and the CLIP to load it with)")  # fmt: skip
        stores, conditioning = {}, self.conditioning
        for field, name in STORES.items():
            if value := getattr(conditioning, field):
                stores[name] = Path(value)
                conditioning = replace(conditioning, **{field: name})
        card = replace(self.card, conditioning=conditioning, generation=self.generation)
        record = training_record(self.source) if self.source else None
        meta = {"family": family_of(self.model), "captioner": self.model.config.to_dict()}

        def extra(folder: Path) -> None:
            for name, store in stores.items():
                shutil.copytree(store, folder / name)
            if record is not None:
                atomic_write_json(folder / TRAINING_NAME, record)
            atomic_write_text(folder / "README.md", model_card(card, meta, record, repo_id=repo_id))

        save_captioner(self.model, self.tokenizer, out_dir, card, extra=extra)
        return Path(out_dir)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool = False,
        token: str | None = None,
        commit_message: str = "Upload pairfree captioner",
    ) -> str:
        """Upload a :meth:`save_pretrained` copy to the Hub model repository ``repo_id``
        (created if missing); returns the commit's URL."""
        with tempfile.TemporaryDirectory() as tmp:
            folder = self.save_pretrained(Path(tmp) / "captioner", repo_id=repo_id)
            return push_folder(folder, repo_id, private=private, token=token,
                               commit_message=commit_message)  # fmt: skip
