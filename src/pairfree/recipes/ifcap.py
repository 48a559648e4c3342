"""IFCap (Lee et al., EMNLP 2024): ViECap's prompts, plus image-like retrieval, a fusion
module and frequency-based entity filtering.

Objective: as ViECap's (caption cross-entropy after a soft prompt and a masked entity prompt,
the prompt read, not predicted), with the soft prompt read from the caption's noised CLIP
text embedding *and* the raw embeddings of k (5) corpus captions retrieved for it:

- **image-like retrieval** (once, before training): each caption's normalized embedding plus
  N(0, 0.04 I) noise, renormalized, retrieves its k nearest corpus captions, the caption
  itself excluded. The noise makes the query look like an image embedding, which is what
  retrieves at inference, so training sees the retrieval quality it will meet;
- **fusion module** (the ``fusion`` mapper): the noised (0.016) embedding, projected to 10
  tokens, cross-attends to a projection of the retrieved embeddings; with 10 learned tokens
  appended it goes through the 8-layer transformer, whose last 10 outputs are the soft prompt;
- **entity filtering** at inference: the image retrieves its l (9 COCO, 7 elsewhere) nearest
  corpus captions by image-to-text cosine; the vocabulary words mentioned at least K times in
  them (5 COCO, 3 Flickr30k, 3 COCO -> Flickr30k, 4 Flickr30k -> COCO) form the hard prompt,
  most frequent first. ``retrieval.min_count: 0`` uses ViECap's zero-shot classifier instead
  (as the original does on NoCaps, threshold 0.2); the first k of the l captions feed the
  fusion module. Cross-domain runs retrieve from the target domain's captions at inference
  (``retrieval.memory``).

Faithful to boreng0817/IFCap's ``main.py`` and scripts: batch 80, lr 2e-5, 5000 linear
warm-up steps, AdamW, 5 epochs on COCO (15 on Flickr30k, the checkpoint its README
evaluates), entity masking 0.4, GPT-2 fine-tuned, ViECap's sentence-cased captions and
ClipCap beam search (greedy on Flickr30k, as its eval script). Ablations: ``retrieval.
noise_variance: 0`` (plain text-to-text retrieval), ``fusion: false`` (ViECap's mapper; the
retrieval still feeds entity filtering), ``retrieval.min_count: 0`` (no entity filtering).

Retrieval reads a second CLIP, as the original's does (``retrieval.clip``, RN50x64): the
corpus' captions under it are the keys of image-like retrieval and, with the test images under
it, of test-time retrieval; the fusion module still reads the retrieved captions' embeddings
under the captioner's CLIP (ViT-B/32). ``retrieval.clip: null`` retrieves with the captioner's
own CLIP (one encoder to load; what the world table runs, having one world CLIP). The second
CLIP's keys travel with the checkpoint (``retrieval-keys/``) and the card names that CLIP.

Where pairfree differs on purpose: entity filtering counts the object
vocabulary's words (see :mod:`pairfree.captioner.entities`); the retrieval noise is drawn
from the run's seed (the original's is seed 30); the retrieved embeddings are float32 (the
original searches in float16). The retrieved captions and the entity vocabulary travel with
the checkpoint (``retrieval/`` and the card), so a saved captioner captions anywhere.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pairfree.captioner import (
    CaptionerConfig,
    CheckpointCard,
    Conditioning,
    GenerationConfig,
    condition,
)
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import Caption
from pairfree.data.cleaning import CleaningConfig
from pairfree.data.training_corpus import CorpusConfig, check_corpus
from pairfree.encoding import encode_captions, encode_corpus
from pairfree.errors import PairfreeError
from pairfree.features import FeatureStore
from pairfree.io import atomic_path
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.retrieval import BACKENDS, image_like_neighbours
from pairfree.training.entity_prompts import (
    EntityConfig,
    PromptedCaption,
    SoftPrompt,
    entity_classifier,
    entity_vocabulary,
    fit_entity_prompted,
)
from pairfree.training.text_only import text_only_setup
from pairfree.training.trainer import TrainConfig, TrainResult


@dataclass
class RetrievalConfig:
    clip: str | None = "open_clip:RN50x64/openai"  # the CLIP that retrieves; null: the captioner's
    k: int = 5  # retrieved captions the fusion module reads (--k)
    noise_variance: float = 0.04  # image-like retrieval's noise; 0: plain text retrieval
    index: str = "exact"  # "exact" | "faiss" (an IVF index above a million captions)
    captions: int = 9  # l: captions a test image retrieves for entity filtering (--L)
    min_count: int = 5  # K: a word in at least K of them enters the prompt; 0: the classifier
    memory: CorpusConfig = field(default_factory=lambda: CorpusConfig(val_fraction=0.0))
    """The captions retrieved from at inference (cross-domain: the target's); no path: the
    training corpus."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.captions < 1 or self.min_count < 0:
            raise PairfreeError(f"retrieval.k and retrieval.captions must be >= 1 and "
                                f"retrieval.min_count >= 0, not {self.k}, {self.captions}, "
                                f"{self.min_count}")  # fmt: skip
        if self.noise_variance < 0:
            raise PairfreeError(f"retrieval.noise_variance must be >= 0, not "
                                f"{self.noise_variance}")  # fmt: skip
        if self.index not in BACKENDS:
            raise PairfreeError(f"retrieval.index must be one of {BACKENDS}, not {self.index!r}")


@dataclass
class IFCapConfig:
    clip: str = "hf:openai/clip-vit-base-patch32"
    features: str | None = None  # cache dir of the encoded corpus; default <output_dir>/features
    corpus: CorpusConfig = field(
        default_factory=lambda: CorpusConfig(cleaning=CleaningConfig(sentence_case=True))
    )
    model: CaptionerConfig = field(
        default_factory=lambda: CaptionerConfig(
            mapper="fusion", mapper_layers=8, prefix_length=10, clip_length=10
        )
    )
    noise_variance: float = 0.016
    hard_prompt: bool = True
    fusion: bool = True  # false: the "without fusion module" ablation (model.mapper as set)
    entities: EntityConfig = field(default_factory=lambda: EntityConfig(ensemble=True))
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=5, lr=2e-5, warmup_steps=5000, batch_size=80)
    )
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            num_beams=5, max_new_tokens=64, stop=".", also_stop=(" .",), search="clipcap",
            stop_at_eos=False,
        )
    )  # fmt: skip

    def __post_init__(self) -> None:
        if self.noise_variance < 0:
            raise PairfreeError(f"noise_variance must be >= 0, not {self.noise_variance}")
        if self.fusion:  # the fusion module is a transformer mapper's
            self.model = replace(self.model, mapper="fusion")
        elif self.model.mapper == "fusion":
            self.model = replace(self.model, mapper="transformer")


def retrieved_for_training(
    store: FeatureStore, retrieval: RetrievalConfig, cache_dir: Path, seed: int, job: Job
) -> torch.Tensor:
    """[N, k] corpus rows retrieved for each training caption by image-like retrieval,
    computed once by the main process and cached beside the features (keyed by the
    captions, k, the noise, the index and the seed), as the original writes its file once."""
    key = hashlib.sha256("\n".join([store.encoder, *(store.texts or [])]).encode())
    key.update(f"{retrieval.k}|{retrieval.noise_variance}|{retrieval.index}|{seed}".encode())
    path = cache_dir.parent / f"{cache_dir.name}-retrieved-{key.hexdigest()[:16]}.safetensors"
    if job.is_main_process and not path.is_file():
        found = image_like_neighbours(store.tensor(), retrieval.k,
                                      noise_variance=retrieval.noise_variance,
                                      generator=torch.Generator().manual_seed(seed),
                                      backend=retrieval.index)  # fmt: skip
        with atomic_path(path) as tmp:
            save_file({"retrieved": found.contiguous()}, str(tmp))
    job.wait_for_everyone()
    return load_file(str(path))["retrieved"]


def retrieval_keys(search: ClipEncoder, store: FeatureStore, job: Job) -> FeatureStore:
    """``store``'s captions, in its order, under the CLIP that retrieves (encoded once, beside
    it): what image-like and test-time retrieval search."""
    digest = hashlib.sha256(search.name.encode()).hexdigest()[:12]
    out = store.path.parent / f"{store.path.name}-keys-{digest}"
    captions = [Caption(t, None, str(store.path), i + 1) for i, t in enumerate(store.texts or [])]
    encode_captions(search, captions, out, job=job)
    job.wait_for_everyone()
    return FeatureStore(out)


def retrieval_memory(cfg: IFCapConfig, clip: ClipEncoder, features: Path, job: Job) -> Path:
    """The store of captions retrieved from at inference: the training corpus' own, or the
    target domain's captions (encoded once, beside the corpus features)."""
    memory = cfg.retrieval.memory
    if not memory.path:
        return features
    digest = hashlib.sha256(f"{Path(memory.path).resolve()}|{memory.split}".encode())
    out = features.parent / f"{features.name}-memory-{digest.hexdigest()[:12]}"
    encode_corpus(clip, replace(memory, cleaning=cfg.corpus.cleaning), out, job)
    return out


def fused_soft_prompt(
    conditioning: Conditioning, captions: torch.Tensor, fusion: bool
) -> SoftPrompt:
    """The noised embedding, and (fusion) its retrieved captions' raw embeddings after it."""

    def soft(emb, extras, generator):
        cond = condition(emb, conditioning, training=True, generator=generator)
        if not fusion:
            return cond
        rows = torch.tensor([x.retrieved for x in extras], dtype=torch.long)
        return torch.cat((cond[:, None], captions[rows].to(cond.device, cond.dtype)), dim=1)

    return soft


@register_recipe("ifcap", IFCapConfig)
def train_ifcap(cfg: IFCapConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """IFCap: text-only training with image-like retrieval, the fusion module and entity
    prompts (filtered from retrieved captions at inference)."""
    check_corpus(cfg.corpus)
    if cfg.retrieval.memory.path:
        check_corpus(cfg.retrieval.memory, "retrieval.memory")
    vocabulary = entity_vocabulary(cfg.entities) if cfg.hard_prompt else None
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    features = Path(cfg.features) if cfg.features else Path(cfg.train.output_dir) / "features"
    store = encode_corpus(clip, cfg.corpus, features, job)
    texts = store.texts
    job.log_skips()
    captions = store.tensor()
    spec = cfg.retrieval.clip if cfg.retrieval.clip not in (None, cfg.clip) else None
    search = load_clip(spec, device=job.state.device) if spec else None
    keys = store if search is None else retrieval_keys(search, store, job)
    retrieved = (retrieved_for_training(keys, cfg.retrieval, features, cfg.train.seed, job)
                 if cfg.fusion else torch.empty(len(texts), 0, dtype=torch.long))  # fmt: skip

    filtering = vocabulary is not None and cfg.retrieval.min_count > 0
    prompts = {}
    if vocabulary is not None and not filtering:
        prompts = entity_classifier(cfg.entities, clip, features, job)
    elif filtering:
        prompts = {"entity_min_count": cfg.retrieval.min_count,
                   "entity_words": sorted(vocabulary.words)}  # fmt: skip
    memory = (retrieval_memory(cfg, clip, features, job)
              if cfg.fusion or filtering else None)  # fmt: skip
    memory_keys = None
    if memory is not None and search is not None:
        memory_keys = retrieval_keys(search, FeatureStore(memory), job).path.resolve()
    conditioning = Conditioning(
        normalize=True,
        noise_variance=cfg.noise_variance,
        retrieval_memory=str(memory.resolve()) if memory else None,
        retrieval_clip=spec if memory_keys else None,
        retrieval_keys=str(memory_keys) if memory_keys else None,
        retrieval_k=cfg.retrieval.k,
        retrieval_captions=cfg.retrieval.captions,
        **prompts,
    )
    limit = cfg.entities.max_entities
    extras = [PromptedCaption(vocabulary.extract(t, limit=limit) if vocabulary else [], row)
              for t, row in zip(texts, retrieved.tolist(), strict=True)]  # fmt: skip
    setup = text_only_setup(texts, captions, cfg.model, cfg.corpus, seed=cfg.train.seed,
                            generation=cfg.generation, extras=extras)  # fmt: skip
    return fit_entity_prompted(
        cfg.train,
        setup,
        fused_soft_prompt(conditioning, captions, cfg.fusion),
        cfg.entities,
        hard_prompt=cfg.hard_prompt,
        card=CheckpointCard("ifcap", cfg.clip, conditioning, cfg.generation),
        run_config={"recipe": "ifcap", **{k: v for k, v in asdict(cfg).items() if k != "train"}},
        resume=resume,
        progress=progress,
    )
