"""Training a captioner on text: each corpus caption conditioned on (a transform of) its own
CLIP text embedding.

CapDec trains exactly this way (with noise), and the GAN recipes use it as their
initialization (without noise, or with an extra term). What they share lives here once: the
corpus (read, cleaned, edited), its CLIP encoding, the tokenized train/validation split, a
fresh captioner, the caption cross-entropy step and its validation, and the one-module run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pairfree.captioner import (
    CaptionerConfig,
    CheckpointCard,
    Conditioning,
    GenerationConfig,
    PrefixCaptioner,
    condition,
    save_captioner,
)
from pairfree.clip import ClipEncoder
from pairfree.data import (
    Caption,
    CleaningConfig,
    clean_captions,
    mix_open_text,
    open_text_sentences,
    randomize_gender,
    read_captions,
)
from pairfree.encoding import encode_captions
from pairfree.errors import PairfreeError, load_failure
from pairfree.features import FeatureStore
from pairfree.job import Job
from pairfree.training.trainer import (
    EvalFn,
    OptimizerSpec,
    SaveFn,
    StepFn,
    TrainConfig,
    Trainer,
    TrainResult,
    ValFn,
)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the corpus
@dataclass
class CorpusConfig:
    path: str = ""  # any corpus reader format (Karpathy JSON, COCO, CC TSV, txt, JSONL)
    format: str = "auto"
    split: str = "train"
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    gender: str = "none"  # none | both | male-only | female-only (in the text CLIP encodes)
    gender_p: float = 0.5  # chance that a gendered word takes the other gender's form
    open_text: str | None = None  # a plain-text file to draw 4-20-word sentences from
    open_text_ratio: float = 0.0  # open sentences added per corpus caption
    seed: int = 0  # draws the gender flips and the open-text sample
    val_fraction: float = 0.01  # captions held out for the validation loss
    max_tokens: int = 40  # longer captions are truncated


def check_corpus(corpus: CorpusConfig) -> None:
    """Fail in a second on a corpus that is not there, before any model is loaded."""
    if not corpus.path:
        raise PairfreeError("corpus.path is not set: give the caption corpus to train on")
    for key, path in (("corpus.path", corpus.path), ("corpus.open_text", corpus.open_text)):
        if path and not Path(path).is_file():
            raise PairfreeError(f"{key}: {path} does not exist")


def prepare_corpus(corpus: CorpusConfig, job: Job) -> list[Caption]:
    """Read, clean and extend the corpus: the exact captions the model will be trained on."""
    check_corpus(corpus)
    captions = read_captions(
        corpus.path, format=corpus.format, split=corpus.split, skip_log=job.skip_log
    )
    texts = clean_captions((cap.text for cap in captions), corpus.cleaning)
    if corpus.open_text:
        sentences = open_text_sentences(corpus.open_text)
        texts = mix_open_text(texts, sentences, corpus.open_text_ratio, seed=corpus.seed)
    return [Caption(text=t, image_id=None, source=corpus.path, line=None) for t in texts]


def encode_corpus(
    clip: ClipEncoder,
    corpus: CorpusConfig,
    out_dir: Path,
    job: Job,
    *,
    edit: Callable[[str], str] | None = None,
    clip_text: Callable[[str], str] | None = None,
) -> FeatureStore:
    """The prepared corpus' CLIP text embeddings, encoded once (sharded over the processes)
    and reused by every later run that asks for the same captions and encoder.

    ``edit`` (if given) rewrites each caption as a recipe's own preprocessing does; CLIP reads
    each caption through ``clip_text`` (if given) and with its gendered words randomized
    (``corpus.gender``); the store keeps the (edited) captions, the targets.
    """
    captions = prepare_corpus(corpus, job)
    if edit is not None:
        captions = [replace(c, text=edit(c.text)) for c in captions]
    if not captions:
        raise PairfreeError(
            f"{corpus.path}: the corpus has no usable sentences ({job.skip_log.summary()})"
        )
    texts = [clip_text(c.text) if clip_text else c.text for c in captions]
    texts = randomize_gender(texts, corpus.gender, corpus.gender_p, seed=corpus.seed)
    encode_captions(clip, captions, out_dir, clip_texts=texts, job=job)
    job.wait_for_everyone()  # the main process marks the store complete after the others return
    return FeatureStore(out_dir)


# --------------------------------------------------------------------------- tokens and data
@dataclass
class CaptionTokens:
    """Token ids per caption (ending with the LM's end-of-text token where it is trained)."""

    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[i]

    def subset(self, indices: Sequence[int]) -> CaptionTokens:
        return CaptionTokens([self.ids[i] for i in indices])


def tokenize_captions(
    tokenizer, texts: Sequence[str], *, max_tokens: int = 40, end_of_text: bool
) -> CaptionTokens:
    """Tokenize once up front (fast tokenizers batch this) and truncate to ``max_tokens``;
    with ``end_of_text`` the last of them is the LM's end-of-text token, a target too, so that
    the captioner learns to stop there (CapDec's and CgT-GAN's code train on the caption's
    tokens only: their captions end where decoding reaches ".")."""
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    if not end_of_text:
        return CaptionTokens([ids[:max_tokens] for ids in encoded])
    if tokenizer.eos_token_id is None:
        raise PairfreeError("the LM's tokenizer has no end-of-text token to end captions with")
    eos = tokenizer.eos_token_id
    return CaptionTokens([ids[: max_tokens - 1] + [eos] for ids in encoded])


def warn_if_captions_never_stop(texts: Sequence[str], generation: GenerationConfig) -> None:
    """Warn where most training captions do not end with the text decoding stops at and
    end-of-text is not trained (the originals' way): such a captioner never learns to stop,
    and every caption it writes runs to ``max_new_tokens`` (a corpus without final periods,
    as the world's, decodes to CIDEr near 0)."""
    if generation.stop_at_eos or not texts:
        return
    stop = generation.stop
    ending = sum(bool(stop) and t.rstrip().endswith(stop) for t in texts)
    if ending < len(texts) / 2:
        logger.warning(
            "%d of %d training captions end with the stop text %r and generation.stop_at_eos "
            "is false (the original code's way): the captioner will not learn to stop, so its "
            "captions run to max_new_tokens=%d; set generation.stop_at_eos=true to train and "
            "stop at end-of-text",
            ending,
            len(texts),
            stop,
            generation.max_new_tokens,
        )


def pad_collate(pad_id: int | None) -> Callable:
    """Stack conditions, right-pad token ids; the mask (not the pad id) marks real tokens."""
    pad_id = pad_id if pad_id is not None else 0

    def collate(batch):
        conditions, ids = zip(*batch, strict=True)
        width = max(len(x) for x in ids)
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        return torch.stack([torch.as_tensor(c) for c in conditions]), input_ids, mask

    return collate


class CaptionEmbeddingDataset(Dataset):
    """(CLIP embedding, caption tokens) pairs."""

    def __init__(self, embeddings: torch.Tensor, tokens: CaptionTokens) -> None:
        if len(embeddings) != len(tokens):
            raise PairfreeError(f"{len(embeddings)} embeddings but {len(tokens)} captions")
        self.embeddings, self.tokens = embeddings, tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int]]:
        return self.embeddings[i], self.tokens[i]


def split_train_val(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = min(n - 1, round(n * fraction)) if fraction > 0 else 0
    return sorted(order[n_val:]), sorted(order[:n_val])


@dataclass
class CaptionerSetup:
    """A fresh captioner, its tokenizer, and its data split into train / validation."""

    model: torch.nn.Module  # a PrefixCaptioner, or a CrossAttentionCaptioner
    tokenizer: Any
    train_data: Dataset
    val_data: Dataset


def text_only_setup(
    texts: Sequence[str],
    embeddings: torch.Tensor,
    model: CaptionerConfig,
    corpus: CorpusConfig,
    *,
    seed: int,
    generation: GenerationConfig,
) -> CaptionerSetup:
    """Tokenize ``texts`` (ending with end-of-text where ``generation`` stops there, as
    :func:`tokenize_captions`), hold out ``corpus.val_fraction`` of them, and build a captioner
    for ``embeddings``' dimension (its mapper initialized from ``seed``)."""
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
    return CaptionerSetup(
        captioner,
        tokenizer,
        CaptionEmbeddingDataset(embeddings[train_idx], tokens.subset(train_idx)),
        CaptionEmbeddingDataset(embeddings[val_idx], tokens.subset(val_idx)),
    )


# --------------------------------------------------------------------------- objective and run
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


def token_weighted(accelerator, loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """This process' mean token loss, rescaled so that DDP's average over processes is the
    mean over every caption token of the global batch, as one process computes it (a plain
    average of per-process means would weigh a token by how full its process' batch was)."""
    if accelerator.num_processes == 1:
        return loss
    tokens = mask.sum().float()
    total = accelerator.reduce(tokens.detach().clone(), reduction="sum")
    return loss * tokens * accelerator.num_processes / total


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


def save_with_card(card: CheckpointCard, tokenizer, module: str = "captioner") -> SaveFn:
    """The trainer's artifact writer: module ``module`` as a captioner checkpoint with ``card``."""

    def save(modules: Mapping[str, torch.nn.Module], path: Path) -> None:
        save_captioner(modules[module], tokenizer, path, card)

    return save


def fit_captioner(
    train: TrainConfig,
    setup: CaptionerSetup,
    step: StepFn,
    val_step: ValFn,
    card: CheckpointCard,
    *,
    run_config: Mapping[str, Any],
    resume: bool = True,
    progress: bool = True,
    collate: Callable | None = None,
    evaluate: EvalFn | None = None,
    lr_by_prefix: Mapping[str, float] | None = None,
) -> TrainResult:
    """Train ``setup.model`` (module "captioner", one AdamW) with ``step``; artifacts carry
    ``card``. Batches are (embedding, tokens) pairs unless ``collate`` says otherwise;
    ``evaluate`` adds validation metrics beyond ``val_step``'s; ``lr_by_prefix`` gives parts
    of the model (by parameter-name prefix) learning rates of their own."""
    trainer = Trainer(
        train,
        {"captioner": setup.model},
        [OptimizerSpec("captioner", lr_by_prefix=dict(lr_by_prefix or {}))],
        setup.train_data,
        step,
        save_with_card(card, setup.tokenizer),
        collate=collate or pad_collate(setup.tokenizer.pad_token_id),
        val_data=setup.val_data if len(setup.val_data) else None,
        val_step=val_step,
        evaluate=evaluate,
        run_config=run_config,
        progress=progress,
    )
    return trainer.fit(resume=resume)
