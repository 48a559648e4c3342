"""Text-only training with an entity-aware hard prompt (ViECap, IFCap): each caption's
soft prompt, then "There are e1, e2 in image." with each of its entities dropped at the
masking rate, then the caption, whose tokens alone are trained on.

What the two recipes share lives here once: the entity settings, their vocabulary and the
zero-shot classifier's store, the masking, and the training and validation steps around a
recipe's own soft prompt (ViECap: the noised embedding; IFCap: it and its retrieved
captions' embeddings).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pairfree.captioner import CheckpointCard, Conditioning, caption_log_probs, condition
from pairfree.captioner.entities import EntityVocabulary, entity_prompt, read_entity_list
from pairfree.clip import ClipEncoder
from pairfree.encoding import encode_entity_classes
from pairfree.errors import PairfreeError
from pairfree.job import Job
from pairfree.training.fitting import CaptionerSetup, fit_captioner, token_weighted
from pairfree.training.text_only import prompted_batch
from pairfree.training.trainer import StepFn, TrainConfig, TrainResult, ValFn


@dataclass
class EntityConfig:
    vocabulary: str | None = None  # object vocabulary file (training entities); required
    classes: str | None = None  # the classifier's classes at inference (default: vocabulary)
    max_entities: int = 10
    mask_rate: float = 0.4
    ensemble: bool = False  # classify with the 7-template prompt ensemble
    top_k: int = 3
    threshold: float = 0.4
    temperature: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_rate <= 1.0:
            raise PairfreeError(f"entities.mask_rate must be in [0, 1], not {self.mask_rate}")
        if self.max_entities < 1 or self.top_k < 1:
            raise PairfreeError(f"entities.max_entities and entities.top_k must be >= 1, not "
                                f"{self.max_entities}, {self.top_k}")  # fmt: skip
        if not 0.0 <= self.threshold <= 1.0 or not self.temperature > 0:
            raise PairfreeError(f"entities.threshold must be in [0, 1] and entities.temperature "
                                f"> 0, not {self.threshold}, {self.temperature}")  # fmt: skip


@dataclass
class PromptedCaption:
    """What rides along with a training caption: its entities, and (IFCap) the corpus rows
    of the captions retrieved for it."""

    entities: list[str]
    retrieved: list[int] = field(default_factory=list)


# (CLIP text embeddings [B, d], the batch's PromptedCaptions, a noise generator or None for
# the global RNG) -> the soft prompt's condition
SoftPrompt = Callable[[torch.Tensor, Sequence[PromptedCaption], torch.Generator | None],
                      torch.Tensor]  # fmt: skip


def entity_vocabulary(entities: EntityConfig) -> EntityVocabulary:
    """The training entities' vocabulary, read (and the classifier's classes checked)
    before any model loads."""
    if not entities.vocabulary:
        raise PairfreeError("entities.vocabulary is not set: give the object vocabulary "
                            "(one name per line, a JSON list, or COCO's instances file)")  # fmt: skip
    if entities.classes:
        read_entity_list(entities.classes)
    return EntityVocabulary(read_entity_list(entities.vocabulary))


def entity_classifier(entities: EntityConfig, clip: ClipEncoder, features: Path, job: Job) -> dict:
    """Encode the zero-shot classifier's classes once (a store beside the corpus features,
    named by their digest) and return the :class:`Conditioning` fields that read it."""
    classes = sorted(read_entity_list(entities.classes or entities.vocabulary))
    digest = hashlib.sha256("\n".join([str(entities.ensemble), *classes]).encode())
    class_dir = features.parent / f"{features.name}-entities-{digest.hexdigest()[:12]}"
    encode_entity_classes(clip, classes, class_dir, ensemble=entities.ensemble, job=job)
    job.wait_for_everyone()
    return {
        "entity_classes": str(class_dir.resolve()),
        "entity_topk": entities.top_k,
        "entity_threshold": entities.threshold,
        "entity_temperature": entities.temperature,
    }


def masked_entities(entities: list[str], rate: float) -> list[str]:
    """Each entity kept with probability ``1 - rate``, the kept ones in a random order (the
    original's ``set()`` order is arbitrary), both drawn from the global RNG (resumable)."""
    kept = [e for e, u in zip(entities, torch.rand(len(entities)).tolist(), strict=True)
            if u >= rate]  # fmt: skip
    return [kept[i] for i in torch.randperm(len(kept)).tolist()]


def noised_soft_prompt(conditioning: Conditioning) -> SoftPrompt:
    """ViECap's soft prompt: the conditioned (noised) embedding alone."""

    def soft(emb, extras, generator):
        return condition(emb, conditioning, training=True, generator=generator)

    return soft


def with_entity_prompts(
    tokenizer, entities: Sequence[list[str]], ids: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each caption after "There are e1, e2 in image.": (ids, mask, target mask), the target
    marking the caption tokens only."""
    prompt_ids = tokenizer([entity_prompt(e) for e in entities],
                           add_special_tokens=False)["input_ids"]  # fmt: skip
    return prompted_batch(prompt_ids, ids, mask, tokenizer.pad_token_id or 0)


def entity_prompted_step(
    soft_prompt: SoftPrompt, tokenizer, *, hard_prompt: bool, mask_rate: float
) -> StepFn:
    """Caption cross-entropy after the soft prompt and the masked entity prompt."""

    def step(ctx, batch):
        emb, ids, mask, extras = batch
        soft = soft_prompt(emb, extras, None)
        target = mask
        if hard_prompt:
            shown = [masked_entities(x.entities, mask_rate) for x in extras]
            ids, mask, target = with_entity_prompts(tokenizer, shown, ids, mask)
        loss = ctx.modules["captioner"](soft, ids, mask, target).loss
        ctx.optimize("captioner", token_weighted(ctx.accelerator, loss, target))
        return {"loss": loss.detach()}

    return step


def entity_prompted_val_step(
    soft_prompt: SoftPrompt, tokenizer, *, hard_prompt: bool, seed: int
) -> ValFn:
    """Caption negative log-likelihood per token after the soft prompt (its noise from a
    generator of its own, so validation leaves the training RNG alone) and every entity of
    the caption (no masking)."""
    noise = torch.Generator().manual_seed(seed)

    def val_step(ctx, batch):
        emb, ids, mask, extras = batch
        soft = soft_prompt(emb, extras, noise)
        target = mask
        if hard_prompt:
            ids, mask, target = with_entity_prompts(tokenizer, [x.entities for x in extras],
                                                    ids, mask)  # fmt: skip
        logits = ctx.unwrap("captioner")(soft, ids, mask, target).logits
        return {"val_loss": -caption_log_probs(logits, ids, target * mask)}

    return val_step


def fit_entity_prompted(
    train: TrainConfig,
    setup: CaptionerSetup,
    soft_prompt: SoftPrompt,
    entities: EntityConfig,
    *,
    hard_prompt: bool,
    card: CheckpointCard,
    run_config: dict,
    resume: bool,
    progress: bool,
) -> TrainResult:
    """Train ``setup``'s captioner with the steps above around ``soft_prompt``."""
    return fit_captioner(
        train,
        setup,
        entity_prompted_step(
            soft_prompt, setup.tokenizer, hard_prompt=hard_prompt, mask_rate=entities.mask_rate
        ),  # fmt: skip
        entity_prompted_val_step(
            soft_prompt, setup.tokenizer, hard_prompt=hard_prompt, seed=train.seed
        ),  # fmt: skip
        card,
        run_config=run_config,
        resume=resume,
        progress=progress,
    )
