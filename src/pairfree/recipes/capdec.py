"""CapDec (Nukrai et al., 2022): a captioner trained on CLIP *text* embeddings only.

Objective: for each corpus caption with CLIP text embedding t, condition the prefix captioner
on ``x = normalize(normalize(t) + eps)`` with eps ~ N(0, sigma^2 I) (sigma^2 = 0.016) or
uniform in a ball of radius sigma, and minimize the caption's token cross-entropy. The noise
covers the region where image embeddings of the same content fall, so at inference the
normalized CLIP *image* embedding can be fed in its place. Options from the paper and its
code: no normalization, a modality offset (mean image minus mean text embedding) added in
training or subtracted at inference, gender rebalancing of the corpus, open-text mixing.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from pairfree.captioner import CaptionerConfig, PrefixCaptioner, save_captioner
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import (
    Caption,
    CleaningConfig,
    clean_captions,
    read_captions,
    read_images,
    split_sentences,
)
from pairfree.encoding import encode_captions, encode_images
from pairfree.errors import PairfreeError, SkipLog
from pairfree.features import FeatureStore
from pairfree.pipeline import GenerationConfig
from pairfree.recipes.text_data import CaptionTokens, pad_collate, tokenize_captions
from pairfree.recipes.trainer import OptimizerSpec, TrainConfig, Trainer, TrainResult


# --------------------------------------------------------------------------- noise and offset
def uniform_ball(shape: torch.Size, radius: float, generator: torch.Generator | None = None):
    """Points uniform in a d-ball of ``radius``: a random direction times radius * U^(1/d)."""
    direction = F.normalize(torch.randn(shape, generator=generator), dim=-1)
    u = torch.rand(shape[:-1] + (1,), generator=generator)
    return direction * radius * u ** (1.0 / shape[-1])


def inject_noise(
    x: torch.Tensor,
    variance: float,
    *,
    kind: str = "gaussian",
    normalize: bool = True,
    offset: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """CapDec's ``noise_injection``: normalize, add noise (and the offset), normalize again."""
    if normalize:
        x = F.normalize(x, dim=-1)
    std = math.sqrt(variance)
    if variance > 0:
        if kind == "gaussian":
            noise = torch.randn(x.shape, generator=generator) * std
        elif kind == "uniform":
            noise = uniform_ball(x.shape, std, generator)
        else:
            raise PairfreeError(f"unknown noise kind {kind!r}: expected 'gaussian' or 'uniform'")
        x = x + noise.to(x.device, x.dtype)
    if offset is not None:
        x = x + offset.to(x.device, x.dtype)
    return F.normalize(x, dim=-1) if normalize else x


def save_offset(path: str | Path, offset: torch.Tensor, *, clip: str, pairs: int) -> None:
    save_file({"offset": offset.contiguous()}, str(path), {"clip": clip, "pairs": str(pairs)})


def load_offset(path: str | Path) -> torch.Tensor:
    return load_file(str(path))["offset"]


def modality_offset(image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
    """Mean normalized image embedding minus mean normalized text embedding (the gap)."""
    return F.normalize(image_embeds, dim=-1).mean(0) - F.normalize(text_embeds, dim=-1).mean(0)


# --------------------------------------------------------------------------- corpus editing
# Word pairs for gender rebalancing; female->male maps "her" to "his".
GENDER_PAIRS: tuple[tuple[str, str], ...] = (
    ("man", "woman"), ("men", "women"), ("boy", "girl"), ("boys", "girls"),
    ("he", "she"), ("his", "her"), ("him", "her"), ("himself", "herself"),
    ("male", "female"), ("males", "females"), ("father", "mother"), ("fathers", "mothers"),
    ("son", "daughter"), ("sons", "daughters"), ("brother", "sister"),
    ("brothers", "sisters"), ("husband", "wife"), ("king", "queen"), ("gentleman", "lady"),
    ("gentlemen", "ladies"), ("guy", "gal"), ("guys", "gals"), ("boyfriend", "girlfriend"),
    ("uncle", "aunt"), ("nephew", "niece"), ("groom", "bride"), ("dad", "mom"),
    ("grandfather", "grandmother"), ("grandpa", "grandma"), ("businessman", "businesswoman"),
    ("policeman", "policewoman"), ("gentleman's", "lady's"), ("man's", "woman's"),
)  # fmt: skip
MALE_TO_FEMALE = {m: f for m, f in GENDER_PAIRS}
FEMALE_TO_MALE = {f: m for m, f in reversed(GENDER_PAIRS)}
GENDER_MODES = ("none", "both", "male-only", "female-only")
_WORD = re.compile(r"[A-Za-z']+")


def _swap(text: str, table: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        word = m.group(0)
        out = table.get(word.lower())
        if out is None:
            return word
        return out.capitalize() if word[0].isupper() else out

    return _WORD.sub(repl, text)


def rebalance_gender(texts: Sequence[str], mode: str, p: float = 0.5, seed: int = 0) -> list[str]:
    """Swap gendered words with probability ``p`` per caption, in the directions of ``mode``.

    ``both``: male captions become female and female ones male; ``male-only``: only captions
    with male words are swapped (to female); ``female-only``: only female ones (to male).
    """
    if mode not in GENDER_MODES:
        raise PairfreeError(f"unknown gender mode {mode!r}: expected one of {GENDER_MODES}")
    if mode == "none":
        return list(texts)
    rng = random.Random(seed)
    out = []
    for text in texts:
        words = {w.lower() for w in _WORD.findall(text)}
        is_male = bool(words & MALE_TO_FEMALE.keys())
        is_female = bool(words & FEMALE_TO_MALE.keys())
        table = None
        if is_male and not is_female and mode in ("both", "male-only"):
            table = MALE_TO_FEMALE
        elif is_female and not is_male and mode in ("both", "female-only"):
            table = FEMALE_TO_MALE
        out.append(_swap(text, table) if table is not None and rng.random() < p else text)
    return out


def open_text_sentences(path: str | Path, min_words: int = 4, max_words: int = 20) -> list[str]:
    """Sentences of ``min_words``..``max_words`` words from any plain-text file."""
    path = Path(path)
    if not path.exists():
        raise PairfreeError(f"open-text file {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [s for s in split_sentences(text) if min_words <= len(s.split()) <= max_words]


def mix_open_text(
    captions: Sequence[str], sentences: Sequence[str], ratio: float, seed: int = 0
) -> list[str]:
    """Append ``round(ratio * len(captions))`` open-text sentences sampled without replacement."""
    n = min(len(sentences), round(ratio * len(captions)))
    return list(captions) + random.Random(seed).sample(list(sentences), n)


# --------------------------------------------------------------------------- config
@dataclass
class CorpusConfig:
    path: str = ""  # any corpus reader format (Karpathy JSON, COCO, CC TSV, txt, JSONL)
    format: str = "auto"
    split: str = "train"
    cleaning: CleaningConfig = field(default_factory=CleaningConfig)
    gender: str = "none"  # none | both | male-only | female-only
    gender_p: float = 0.5
    open_text: str | None = None  # a plain-text file to draw 4-20-word sentences from
    open_text_ratio: float = 0.0  # open sentences added per corpus caption
    val_fraction: float = 0.01  # captions held out for the validation loss
    max_tokens: int = 40  # longer captions are truncated


@dataclass
class NoiseConfig:
    variance: float = 0.016
    kind: str = "gaussian"  # gaussian | uniform (in a ball of radius sqrt(variance))
    normalize: bool = True


@dataclass
class OffsetConfig:
    path: str | None = None  # written by `pairfree offset`
    mode: str = "none"  # "train": add it to text embeddings; "inference": subtract from images


@dataclass
class CapDecConfig:
    clip: str = "hf:openai/clip-vit-base-patch32"
    features: str | None = None  # cache dir of the encoded corpus; default <output_dir>/features
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    model: CaptionerConfig = field(
        default_factory=lambda: CaptionerConfig(
            mapper="transformer", mapper_layers=8, prefix_length=40, clip_length=40
        )
    )
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    offset: OffsetConfig = field(default_factory=OffsetConfig)
    # "text": CapDec. "image": each caption's own image embedding instead (corpus.path must be
    # a dataset with images): the paired ClipCap upper bound to compare text-only runs with.
    condition: str = "text"
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=10, lr=2e-5, warmup_steps=5000, batch_size=40)
    )
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(num_beams=5, max_new_tokens=67, stop=".")
    )


# --------------------------------------------------------------------------- data
def prepare_corpus(cfg: CapDecConfig, skip_log: SkipLog) -> list[Caption]:
    """Read, clean and edit the corpus: the exact captions the model will be trained on."""
    c = cfg.corpus
    if not c.path:
        raise PairfreeError("corpus.path is not set: give the caption corpus to train on")
    captions = read_captions(c.path, format=c.format, split=c.split, skip_log=skip_log)
    texts = clean_captions((cap.text for cap in captions), c.cleaning)
    texts = rebalance_gender(texts, c.gender, c.gender_p, seed=cfg.train.seed)
    if c.open_text:
        sentences = open_text_sentences(c.open_text)
        texts = mix_open_text(texts, sentences, c.open_text_ratio, seed=cfg.train.seed)
    return [Caption(text=t, image_id=None, source=c.path, line=None) for t in texts]


def paired_image_condition(
    cfg: CapDecConfig, clip: ClipEncoder, features_dir: Path, shard: dict
) -> tuple[list[str], torch.Tensor]:
    """The paired upper bound (ClipCap): every reference caption of a dataset split with its
    own image's CLIP embedding, the images encoded into ``features_dir/images``."""
    items = read_images(cfg.corpus.path, split=cfg.corpus.split, skip_log=shard["skip_log"])
    pairs = [(it.image_id, it.path) for it in items if it.path is not None]
    encode_images(clip, pairs, features_dir / "images", **shard)
    shard["barrier"]()  # rank 0 marks the store complete after the others return
    store = FeatureStore(features_dir / "images")
    row = {image_id: i for i, image_id in enumerate(store.ids)}
    texts, rows = [], []
    for it in items:
        if it.image_id in row:  # unreadable images were skipped and reported
            cleaned = clean_captions(it.references, cfg.corpus.cleaning)
            texts += cleaned
            rows += [row[it.image_id]] * len(cleaned)
    if not texts:
        raise PairfreeError(f"{cfg.corpus.path}: no captioned images in split {cfg.corpus.split!r}")
    return texts, store.tensor()[rows]


class CaptionEmbeddingDataset(Dataset):
    """(CLIP text embedding, caption tokens) pairs."""

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


# --------------------------------------------------------------------------- training
def train_capdec(cfg: CapDecConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """Encode the corpus (cached, sharded over the processes), then train the captioner on
    noisy text embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(cfg.train.output_dir)
    skip_log = SkipLog()
    state = PartialState(cpu=cfg.train.cpu)
    clip = load_clip(cfg.clip, device=state.device)
    features_dir = Path(cfg.features) if cfg.features else out / "features"
    shard = {
        "skip_log": skip_log,
        "progress": progress,
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "barrier": state.wait_for_everyone,
    }
    if cfg.condition == "text":
        encode_captions(clip, prepare_corpus(cfg, skip_log), features_dir, **shard)
        state.wait_for_everyone()  # rank 0 marks the store complete after the others return
        store = FeatureStore(features_dir)
        texts, embeddings = store.texts, store.tensor()
    elif cfg.condition == "image":
        texts, embeddings = paired_image_condition(cfg, clip, features_dir, shard)
    else:
        raise PairfreeError(f"condition must be text or image, not {cfg.condition!r}")
    if skip_log:
        print(skip_log.summary())

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.lm)
    tokens = tokenize_captions(tokenizer, texts, max_tokens=cfg.corpus.max_tokens)
    train_idx, val_idx = split_train_val(len(tokens), cfg.corpus.val_fraction, cfg.train.seed)
    train_data = CaptionEmbeddingDataset(embeddings[train_idx], tokens.subset(train_idx))
    val_data = CaptionEmbeddingDataset(embeddings[val_idx], tokens.subset(val_idx))

    model_cfg = cfg.model
    model_cfg.embed_dim = embeddings.shape[1]
    torch.manual_seed(cfg.train.seed)  # the mapper's initialization is part of the run
    model = PrefixCaptioner(model_cfg, AutoModelForCausalLM.from_pretrained(model_cfg.lm))
    offset = load_offset(cfg.offset.path) if cfg.offset.path else None
    if cfg.offset.mode not in ("none", "train", "inference"):
        raise PairfreeError(
            f"offset.mode must be none, train or inference, not {cfg.offset.mode!r}"
        )
    if cfg.offset.mode != "none" and offset is None:
        raise PairfreeError("offset.mode is set but offset.path is not (run `pairfree offset`)")
    train_offset = offset if cfg.offset.mode == "train" else None

    def step(ctx, batch):
        emb, ids, mask = batch
        cond = inject_noise(
            emb,
            cfg.noise.variance,
            kind=cfg.noise.kind,
            normalize=cfg.noise.normalize,
            offset=train_offset,
        )
        loss = ctx.modules["captioner"](cond, ids, mask).loss
        ctx.optimize("captioner", loss)
        return {"loss": loss.detach()}

    val_noise = torch.Generator().manual_seed(cfg.train.seed)

    def val_step(ctx, batch):
        emb, ids, mask = batch
        cond = inject_noise(
            emb.cpu(),
            cfg.noise.variance,
            kind=cfg.noise.kind,
            normalize=cfg.noise.normalize,
            offset=train_offset,
            generator=val_noise,
        ).to(emb.device)
        logp = ctx.unwrap("captioner").sequence_log_probs(cond, ids, mask, length_normalize=True)
        return {"val_loss": -logp}

    inference = {
        "normalize": cfg.noise.normalize,
        "offset": (-offset).tolist() if cfg.offset.mode == "inference" else None,
    }

    def save(modules, path: Path) -> None:
        save_captioner(
            modules["captioner"],
            tokenizer,
            path,
            extra={
                "recipe": "capdec",
                "clip": cfg.clip,
                "condition": inference,
                "generation": asdict(cfg.generation),
            },
        )

    trainer = Trainer(
        cfg.train,
        {"captioner": model},
        [OptimizerSpec("captioner", "captioner")],
        train_data,
        step,
        save,
        collate=pad_collate(tokenizer.pad_token_id),
        val_data=val_data if len(val_data) else None,
        val_step=val_step,
        run_config={"recipe": "capdec", **{k: v for k, v in asdict(cfg).items() if k != "train"}},
        progress=progress,
    )
    return trainer.fit(resume=resume)
