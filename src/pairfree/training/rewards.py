"""The pieces the two GAN recipes (CgT-GAN, SCST-GAN) share.

- aggregated textual embeddings: what an image "should" be described as, built from the
  corpus alone: ``a = sum_i softmax(t * cos(v, C))_i C_i`` over the un-normalized corpus text
  embeddings C, streamed in chunks so the corpus may hold millions of sentences;
- the CLIP reward ``r = 0.5 s cos(a, e) + 0.5 s (1 - mean|a - e|)`` of a generated caption
  with CLIP text embedding e (optionally blended with ``s cos(v, e)``);
- the text discriminator (any Hugging Face sequence encoder + an MLP head), whose logit is
  the naturalness reward;
- the self-critical policy-gradient loss with a greedy or leave-one-out baseline;
- the Gaussian-kernel MMD between two sets of vectors (SCST-GAN's initialization).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pairfree.errors import PairfreeError, load_failure
from pairfree.features import FeatureStore, Item, StoreInfo, write_store
from pairfree.job import Job
from pairfree.projection import softmax_pool


# --------------------------------------------------------------------------- aggregation
def _corpus_chunks(
    corpus: torch.Tensor | FeatureStore, chunk: int, device: torch.device | str
) -> Iterator[torch.Tensor]:
    """Float32 blocks of at most ``chunk`` corpus rows; a store is read shard by shard."""
    shards = corpus.iter_shards() if isinstance(corpus, FeatureStore) else [corpus]
    for shard in shards:
        for start in range(0, len(shard), chunk):
            block = shard[start : start + chunk]
            if isinstance(block, np.ndarray):
                block = torch.from_numpy(np.array(block, dtype=np.float32))
            yield block.to(device, torch.float32)


def aggregate_text_embeddings(
    images: torch.Tensor,
    corpus: torch.Tensor | FeatureStore,
    temperature: float,
    *,
    chunk: int = 65536,
) -> torch.Tensor:
    """``a = softmax(t * cos(v, C)) @ C`` for image embeddings ``images`` [B, d].

    The softmax runs over the whole corpus with a running log-sum-exp
    (:func:`pairfree.projection.softmax_pool`), so the largest intermediate is [B, chunk],
    never [B, N]. C stays un-normalized in the weighted sum (CgT-GAN's choice: the
    result lives where CLIP puts text embeddings, not on the unit sphere).
    """
    blocks = _corpus_chunks(corpus, chunk, images.device)
    return softmax_pool(images, blocks, temperature, normalize_values=False)


def write_aggregated_store(
    out_dir: str | Path,
    image_store: FeatureStore,
    corpus_store: FeatureStore,
    temperature: float,
    *,
    chunk: int = 65536,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    job: Job | None = None,
) -> FeatureStore | None:
    """Aggregated embeddings of every image of ``image_store``, cached as a feature store.

    Rows keep the image ids. The store's encoder name records the temperature and the plan
    digests of both input stores, so a changed corpus or image set is never served stale rows.
    Returns the store on the main process (``None`` elsewhere), as :func:`write_store` does.
    """
    if image_store.kind != "image" or corpus_store.kind != "text":
        raise PairfreeError(
            f"aggregation needs an image store and a text store, got {image_store.path} "
            f"({image_store.kind}) and {corpus_store.path} ({corpus_store.kind})"
        )
    if image_store.encoder != corpus_store.encoder:
        raise PairfreeError(
            f"{image_store.path} was encoded with {image_store.encoder}, "
            f"{corpus_store.path} with {corpus_store.encoder}"
        )
    images = image_store.tensor()
    source = (
        f"{image_store.encoder}|aggregate(t={temperature:g},"
        f"images={image_store.manifest['plan_digest'][:16]},"
        f"corpus={corpus_store.manifest['plan_digest'][:16]})"
    )
    items = [Item(image_id, row) for row, image_id in enumerate(image_store.ids)]

    def encode(rows: list[int]) -> torch.Tensor:
        batch = images[rows].to(device)
        return aggregate_text_embeddings(batch, corpus_store, temperature, chunk=chunk).cpu()

    return write_store(
        out_dir,
        items,
        encode,
        StoreInfo(encoder=source, kind="aggregated", normalized=False),
        batch_size=batch_size,
        shard_size=max(batch_size, 8192),
        job=job,
    )


# --------------------------------------------------------------------------- CLIP reward
def without_final_period(caption: str) -> str:
    """What CLIP reads of a caption in CgT-GAN: stripped, without its final ".". Its corpus
    is encoded this way for the aggregation, and each generated caption for its reward."""
    text = caption.strip()
    return text[:-1] if text.endswith(".") else text


def clip_reward(
    text_embeds: torch.Tensor,
    aggregated: torch.Tensor,
    image_embeds: torch.Tensor | None = None,
    *,
    scale: float = 100.0,
    cos_weight: float = 0.5,
    clip_weight: float = 0.0,
) -> torch.Tensor:
    """[N] CgT-GAN's CLIP reward of captions with CLIP text embeddings ``text_embeds`` [N, d].

    ``cos_weight * s * cos(a, e) + (1 - cos_weight) * s * (1 - mean|a - e|)`` against the
    aggregated embedding a; with ``clip_weight > 0`` that is blended with the image-text
    similarity ``s * cos(v, e)``. The L1 term compares un-normalized vectors, as CLIP emits them.
    """
    e = text_embeds.float()
    a = aggregated.float()
    cosine = F.cosine_similarity(a, e, dim=-1)
    l1 = (a - e).abs().mean(dim=-1)
    reward = cos_weight * scale * cosine + (1 - cos_weight) * scale * (1 - l1)
    if clip_weight:
        if image_embeds is None:
            raise ValueError("clip_weight > 0 needs the image embeddings")
        image_term = scale * F.cosine_similarity(image_embeds.float(), e, dim=-1)
        reward = (1 - clip_weight) * reward + clip_weight * image_term
    return reward


# --------------------------------------------------------------------------- discriminator
class TextDiscriminator(nn.Module):
    """A sequence encoder and an MLP head (h -> h/2 -> 1, Tanh) giving one real/fake logit.

    The sentence vector is the encoder's pooler output when it has one (RoBERTa, BERT), else
    its first token's last hidden state. The tokenizer travels with the module (not as a
    submodule) so the recipe tokenizes real and generated sentences the same way.
    """

    def __init__(self, encoder: nn.Module, tokenizer, *, max_length: int = 22) -> None:
        super().__init__()
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.max_length = max_length
        hidden = encoder.config.hidden_size
        self.head = nn.Sequential(
            nn.Linear(hidden, hidden // 2), nn.Tanh(), nn.Linear(hidden // 2, 1)
        )

    @classmethod
    def from_pretrained(cls, name: str, *, max_length: int = 22) -> TextDiscriminator:
        """Any Hugging Face encoder by hub id or local directory (``roberta-base`` in the paper)."""
        from transformers import AutoModel, AutoTokenizer

        try:
            encoder = AutoModel.from_pretrained(name)
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise load_failure(f"the discriminator encoder {name!r}", name, err) from err
        return cls(encoder, tokenizer, max_length=max_length)

    def tokenize(
        self, texts: Sequence[str], device: torch.device | str = "cpu"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded ``(input_ids, attention_mask)``, truncated to ``max_length`` tokens."""
        enc = self.tokenizer(
            list(texts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return enc["input_ids"].to(device), enc["attention_mask"].to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            pooled = out.last_hidden_state[:, 0]
        return self.head(pooled).squeeze(-1)


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: corpus sentences are real (1), generated captions fake (0)."""
    logits = torch.cat((real_logits, fake_logits))
    labels = torch.cat((torch.ones_like(real_logits), torch.zeros_like(fake_logits)))
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


# --------------------------------------------------------------------------- self-critical
BASELINES = ("greedy", "leave-one-out")


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """[B, k] baseline of each sample: the mean reward of the other k - 1 samples of its image."""
    k = rewards.shape[1]
    if k < 2:
        raise ValueError("a leave-one-out baseline needs at least 2 samples per image")
    return (rewards.sum(dim=1, keepdim=True) - rewards) / (k - 1)


def self_critical_loss(
    log_probs: torch.Tensor, rewards: torch.Tensor, baseline: torch.Tensor
) -> torch.Tensor:
    """``-mean((r(w_s) - b) * logp(w_s))``: raise samples that beat the baseline, lower the rest.

    ``rewards`` and ``baseline`` carry no gradient; ``log_probs`` does.
    """
    advantage = (rewards - baseline).detach().to(log_probs.dtype)
    return -(advantage.reshape(-1) * log_probs.reshape(-1)).mean()


def reward_mix(step: int, *, weight: float, hold_steps: int, ramp_steps: int) -> float:
    """lambda of ``lambda * L_clip + (1 - lambda) * L_disc``: 0 for ``hold_steps``, then linear
    to ``weight`` over ``ramp_steps``."""
    if step < hold_steps:
        return 0.0
    return weight * min(1.0, (step - hold_steps) / max(1, ramp_steps))


# --------------------------------------------------------------------------- MMD
def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, sigma: float = 0.1) -> torch.Tensor:
    """Squared maximum mean discrepancy between the rows of ``x`` and ``y`` (biased estimate)
    under ``k(u, w) = exp(-|u - w|^2 / (2 sigma^2))``: 0 when the two sets are the same."""

    def kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # squared distances expanded, not cdist: its gradient at distance 0 is not finite
        sq = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * a @ b.T
        return torch.exp(-sq.clamp(min=0) / (2 * sigma**2)).mean()

    x, y = x.float(), y.float()
    return kernel(x, x) + kernel(y, y) - 2 * kernel(x, y)
