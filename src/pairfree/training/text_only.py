"""Training a captioner on text: each corpus caption conditioned on (a transform of) its own
CLIP text embedding.

CapDec trains exactly this way (with noise), and the GAN recipes use it as their
initialization (without noise, or with an extra term). What they share lives here once: the
tokenized train/validation split with a fresh prefix captioner, the caption cross-entropy step
and its validation. The corpus is :mod:`pairfree.data.training_corpus`, its encoding
:func:`pairfree.encoding.encode_corpus`, the run :func:`pairfree.training.fitting.fit_captioner`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pairfree.captioner import (
    CaptionerConfig,
    Conditioning,
    GenerationConfig,
    PrefixCaptioner,
    condition,
)
from pairfree.data.training_corpus import CorpusConfig
from pairfree.errors import load_failure
from pairfree.training.fitting import (
    CaptionEmbeddingDataset,
    CaptionerSetup,
    pad_ids,
    split_train_val,
    token_weighted,
    tokenize_captions,
    warn_if_captions_never_stop,
)
from pairfree.training.trainer import StepFn, ValFn


def text_only_setup(
    texts: Sequence[str],
    embeddings: torch.Tensor,
    model: CaptionerConfig,
    corpus: CorpusConfig,
    *,
    seed: int,
    generation: GenerationConfig,
    extras: Sequence | None = None,
) -> CaptionerSetup:
    """Tokenize ``texts`` (ending with end-of-text where ``generation`` stops there, as
    :func:`tokenize_captions`), hold out ``corpus.val_fraction`` of them, and build a captioner
    for ``embeddings``' dimension (its mapper initialized from ``seed``). ``extras`` (one item
    per text) ride along with their captions into the batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    warn_if_captions_never_stop(texts, generation)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.lm)
        tokens = tokenize_captions(
            tokenizer, texts, max_tokens=corpus.max_tokens, end_of_text=generation.stop_at_eos
        )
        train_idx, val_idx = split_train_val(len(tokens), corpus.val_fraction, seed)
        model.embed_dim = embeddings.shape[1]
        torch.manual_seed(seed)  # the mapper's initialization is part of the run
        captioner = PrefixCaptioner(model, AutoModelForCausalLM.from_pretrained(model.lm))
    except OSError as err:  # not on disk, and the hub unreachable or the id unknown
        raise load_failure(f"the LM model.lm={model.lm!r}", model.lm, err) from err

    def part(indices: list[int]) -> CaptionEmbeddingDataset:
        chosen = None if extras is None else [extras[i] for i in indices]
        return CaptionEmbeddingDataset(embeddings[indices], tokens.subset(indices), chosen)

    return CaptionerSetup(captioner, tokenizer, part(train_idx), part(val_idx))


def prompted_batch(
    prompt_ids: Sequence[Sequence[int]], ids: torch.Tensor, mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's hard prompt, then its caption, right-padded: (ids, mask, target mask), the
    target mask marking the caption tokens only (the prompt is read, not predicted)."""
    rows, targets = [], []
    for prompt, caption, real in zip(prompt_ids, ids.tolist(), mask.tolist(), strict=True):
        caption = caption[: sum(real)]
        rows.append([*prompt, *caption])
        targets.append([0] * len(prompt) + [1] * len(caption))
    joined, joined_mask = pad_ids(rows, pad_id)
    target, _ = pad_ids(targets, 0)
    return joined.to(ids.device), joined_mask.to(ids.device), target.to(ids.device)


def caption_step(conditioning: Conditioning) -> StepFn:
    """The text-only objective: token cross-entropy of each caption given
    ``condition(t)`` of its own embedding t (noise drawn from the global RNG)."""

    def step(ctx, batch):
        emb, ids, mask = batch
        cond = condition(emb, conditioning, training=True)
        loss = ctx.modules["captioner"](cond, ids, mask).loss
        ctx.optimize("captioner", token_weighted(ctx.accelerator, loss, mask))
        return {"loss": loss.detach()}

    return step


def caption_val_step(conditioning: Conditioning, seed: int) -> ValFn:
    """Length-normalized caption negative log-likelihood under the training conditioning,
    its noise drawn from a generator of its own so validation leaves the training RNG alone."""
    noise = torch.Generator().manual_seed(seed)

    def val_step(ctx, batch):
        emb, ids, mask = batch
        cond = condition(emb.cpu(), conditioning, training=True, generator=noise).to(emb.device)
        logp = ctx.unwrap("captioner").sequence_log_probs(cond, ids, mask, length_normalize=True)
        return {"val_loss": -logp}

    return val_step
