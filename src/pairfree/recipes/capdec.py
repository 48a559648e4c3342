"""CapDec (Nukrai et al., 2022): a captioner trained on CLIP *text* embeddings only.

Objective: for each corpus caption with CLIP text embedding t, condition the prefix captioner
on ``x = normalize(normalize(t) + eps)`` with eps ~ N(0, sigma^2 I) (sigma^2 = 0.016) or
uniform in a ball of radius sigma, and minimize the caption's token cross-entropy. The noise
covers the region where image embeddings of the same content fall, so at inference the
normalized CLIP *image* embedding can be fed in its place. Options from the paper and its
code: no normalization, a modality offset (mean image minus mean text embedding) added in
training or subtracted at inference, gender rebalancing of the text CLIP encodes, open-text
mixing. As in CapDec's ``train.py``, the targets are the caption's tokens only, and captions
are decoded as its ``generate_beam`` does (``search="clipcap"``, beam 5, stop at "." and
never at end-of-text); see :mod:`pairfree.captioner.conditioning` for how the embedding is fed.

Where pairfree differs from the original code, on purpose, as an option:
``generation.stop_at_eos: true`` also trains every caption to end with end-of-text and stops
decoding there, so that a corpus whose captions do not end with "." (web captions) still
teaches the captioner where to stop; the original's captioner then runs to 67 tokens.

``condition=image`` trains the same decoder on each caption's own image embedding instead: the
paired ClipCap upper bound to compare text-only runs with (it needs a captioned dataset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pairfree.captioner import (
    CaptionerConfig,
    CheckpointCard,
    Conditioning,
    GenerationConfig,
    load_offset,
)
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import clean_captions, dataset_images
from pairfree.data.training_corpus import CorpusConfig, check_corpus
from pairfree.encoding import encode_corpus, encode_images
from pairfree.errors import PairfreeError
from pairfree.features import FeatureStore
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.training.fitting import fit_captioner
from pairfree.training.text_only import caption_step, caption_val_step, text_only_setup
from pairfree.training.trainer import TrainConfig, TrainResult


# --------------------------------------------------------------------------- config
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
    condition: str = "text"  # "text": CapDec; "image": the paired upper bound (see above)
    # the original's train.py: one GPU, batch 34 (30 with --data COCO, 16 with FLICKR),
    # transformers' AdamW without weight decay
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=10, lr=2e-5, warmup_steps=5000, batch_size=34)
    )
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            num_beams=5, max_new_tokens=67, stop=".", search="clipcap", stop_at_eos=False
        )
    )

    def __post_init__(self) -> None:
        if self.condition not in ("text", "image"):
            raise PairfreeError(f"condition must be text or image, not {self.condition!r}")

    @property
    def conditioning(self) -> Conditioning:
        return Conditioning(
            normalize=self.noise.normalize,
            noise_variance=self.noise.variance,
            noise_kind=self.noise.kind,
            offset=load_offset(self.offset.path) if self.offset.path else None,
            offset_mode=self.offset.mode,
        )


# --------------------------------------------------------------------------- data
def paired_image_condition(
    cfg: CapDecConfig, clip: ClipEncoder, features_dir: Path, job: Job
) -> tuple[list[str], torch.Tensor]:
    """The paired upper bound (ClipCap): every reference caption of a dataset split with its
    own image's CLIP embedding, the images encoded into ``features_dir/images``."""
    items = dataset_images(cfg.corpus.path, split=cfg.corpus.split, skip_log=job.skip_log)
    encode_images(clip, [(it.image_id, it.path) for it in items], features_dir / "images", job=job)
    job.wait_for_everyone()  # the main process marks the store complete after the others return
    store = FeatureStore(features_dir / "images")
    texts, rows = [], []
    for it in items:
        if it.image_id in store:  # unreadable images were skipped and reported
            cleaned = clean_captions(it.references, cfg.corpus.cleaning)
            texts += cleaned
            rows += [store.row(it.image_id)] * len(cleaned)
    if not texts:
        raise PairfreeError(f"{cfg.corpus.path}: no captioned images in split {cfg.corpus.split!r}")
    return texts, store.tensor()[rows]


# --------------------------------------------------------------------------- training
@register_recipe("capdec", CapDecConfig)
def train_capdec(cfg: CapDecConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """CapDec: text-only training on noise-injected CLIP text embeddings."""
    conditioning = cfg.conditioning  # checked (offset file, modes) before any encoding
    check_corpus(cfg.corpus)
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    features = Path(cfg.features) if cfg.features else Path(cfg.train.output_dir) / "features"
    if cfg.condition == "text":
        store = encode_corpus(clip, cfg.corpus, features, job)
        texts, embeddings = store.texts, store.tensor()
    else:
        texts, embeddings = paired_image_condition(cfg, clip, features, job)
    job.log_skips()

    # the objective: caption cross-entropy given condition(t), i.e. normalize(normalize(t) + eps)
    # trained to end with end-of-text only where it decodes to stop there (the original: never)
    setup = text_only_setup(texts, embeddings, cfg.model, cfg.corpus, seed=cfg.train.seed,
                            generation=cfg.generation)  # fmt: skip
    return fit_captioner(
        cfg.train,
        setup,
        caption_step(conditioning),
        caption_val_step(conditioning, seed=cfg.train.seed),
        CheckpointCard("capdec", cfg.clip, conditioning, cfg.generation),
        run_config={"recipe": "capdec", **{k: v for k, v in asdict(cfg).items() if k != "train"}},
        resume=resume,
        progress=progress,
    )
