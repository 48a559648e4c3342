"""ViECap (Fei et al., ICCV 2023): CapDec's noised soft prompt plus an entity-aware hard prompt.

Objective: for each corpus caption with CLIP text embedding t and entities E (its nouns that
the object vocabulary knows, person words as "person", at most ``max_entities``), the prefix
captioner reads ``[mapper(normalize(normalize(t) + eps)) ; "There are e1, e2 in image." ;
caption]`` and minimizes the caption tokens' cross-entropy (the prompt is read, not
predicted), eps ~ N(0, 0.016 I). Each entity is dropped from the prompt with probability
``mask_rate`` (0.4) at every step, so the decoder learns to say what the prompt leaves out:
at inference the entities come from a zero-shot CLIP classifier over the image, which misses
some. At inference the soft prompt is the normalized image embedding, without noise; the
entities are the top ``top_k`` (3) classes of softmax(cosine / 0.01) over "A photo of a/an
{class}." (or its 7-template prompt ensemble) with probability at least ``threshold`` (0.4).

Faithful to FeiElysia/ViECap's ``main.py`` (COCO script): batch 80, lr 2e-5, 15 epochs, 5000
linear warm-up steps, AdamW, the transformer mapper (8 layers, 10 soft-prompt tokens from
10 CLIP tokens) with the soft prompt first, GPT-2 fine-tuned, captions sentence-cased with a
final "." and no end-of-text, decoding with ClipCap's beam search (5 beams, 64 tokens, stop
at "." or " ."). ``hard_prompt: false`` is the paper's "without hard prompt" ablation
(CapDec with ViECap's mapper), ``entities.mask_rate: 0`` its "without entity masking" one.

Where pairfree differs on purpose (see also :mod:`pairfree.captioner.entities`):
the entities come from matching the object vocabulary (a file: one name per line, a JSON
list, or COCO's categories) instead of NLTK's tagger, whose data cannot be installed
offline, and the original's Visual Genome pickle is not read (pairfree never unpickles a
file): give its words as a text file. Without ``entities.vocabulary`` the classifier's
classes are the vocabulary. AMP is the trainer's ``mixed_precision`` choice.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from pairfree.captioner import (
    CaptionerConfig,
    CheckpointCard,
    Conditioning,
    GenerationConfig,
    caption_log_probs,
    condition,
)
from pairfree.captioner.entities import EntityVocabulary, entity_prompt, read_entity_list
from pairfree.clip import load_clip
from pairfree.data.cleaning import CleaningConfig
from pairfree.data.training_corpus import CorpusConfig, check_corpus
from pairfree.encoding import encode_corpus, encode_entity_classes
from pairfree.errors import PairfreeError
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.training.fitting import fit_captioner, token_weighted
from pairfree.training.text_only import prompted_batch, text_only_setup
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
class ViECapConfig:
    clip: str = "hf:openai/clip-vit-base-patch32"
    features: str | None = None  # cache dir of the encoded corpus; default <output_dir>/features
    corpus: CorpusConfig = field(
        default_factory=lambda: CorpusConfig(cleaning=CleaningConfig(sentence_case=True))
    )
    model: CaptionerConfig = field(
        default_factory=lambda: CaptionerConfig(
            mapper="transformer", mapper_layers=8, prefix_length=10, clip_length=10
        )
    )
    noise_variance: float = 0.016
    hard_prompt: bool = True
    entities: EntityConfig = field(default_factory=EntityConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(epochs=15, lr=2e-5, warmup_steps=5000, batch_size=80)
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


def masked_entities(entities: list[str], rate: float) -> list[str]:
    """Each entity kept with probability ``1 - rate``, the kept ones in a random order (the
    original's ``set()`` order is arbitrary), both drawn from the global RNG (resumable)."""
    kept = [e for e, u in zip(entities, torch.rand(len(entities)).tolist(), strict=True)
            if u >= rate]  # fmt: skip
    return [kept[i] for i in torch.randperm(len(kept)).tolist()]


def viecap_step(conditioning: Conditioning, tokenizer, cfg: ViECapConfig) -> StepFn:
    """Caption cross-entropy after the noised soft prompt and the masked entity prompt."""
    pad = tokenizer.pad_token_id or 0

    def step(ctx, batch):
        emb, ids, mask, entities = batch
        soft = condition(emb, conditioning, training=True)
        target = mask
        if cfg.hard_prompt:
            prompts = [entity_prompt(masked_entities(e, cfg.entities.mask_rate)) for e in entities]
            prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
            ids, mask, target = prompted_batch(prompt_ids, ids, mask, pad)
        loss = ctx.modules["captioner"](soft, ids, mask, target).loss
        ctx.optimize("captioner", token_weighted(ctx.accelerator, loss, target))
        return {"loss": loss.detach()}

    return step


def viecap_val_step(conditioning: Conditioning, tokenizer, cfg: ViECapConfig, seed: int) -> ValFn:
    """Caption negative log-likelihood per token after the soft prompt (its noise from a
    generator of its own) and every entity of the caption (no masking)."""
    noise = torch.Generator().manual_seed(seed)
    pad = tokenizer.pad_token_id or 0

    def val_step(ctx, batch):
        emb, ids, mask, entities = batch
        soft = condition(emb.cpu(), conditioning, training=True, generator=noise)
        target = mask
        if cfg.hard_prompt:
            prompt_ids = tokenizer([entity_prompt(e) for e in entities],
                                   add_special_tokens=False)["input_ids"]  # fmt: skip
            ids, mask, target = prompted_batch(prompt_ids, ids, mask, pad)
        logits = ctx.unwrap("captioner")(soft.to(emb.device), ids, mask, target).logits
        return {"val_loss": -caption_log_probs(logits, ids, target * mask)}

    return val_step


@register_recipe("viecap", ViECapConfig)
def train_viecap(cfg: ViECapConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """ViECap: text-only training with a noised soft prompt and an entity-aware hard prompt."""
    check_corpus(cfg.corpus)
    vocabulary = classes = None
    if cfg.hard_prompt:
        if not cfg.entities.vocabulary:
            raise PairfreeError("entities.vocabulary is not set: give the object vocabulary "
                                "(one name per line, a JSON list, or COCO's instances file)")  # fmt: skip
        vocabulary = EntityVocabulary(read_entity_list(cfg.entities.vocabulary))
        classes = sorted(read_entity_list(cfg.entities.classes or cfg.entities.vocabulary))
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    features = Path(cfg.features) if cfg.features else Path(cfg.train.output_dir) / "features"
    store = encode_corpus(clip, cfg.corpus, features, job)
    texts = store.texts
    job.log_skips()

    class_dir = None
    if classes is not None:
        digest = hashlib.sha256("\n".join([str(cfg.entities.ensemble), *classes]).encode())
        class_dir = features.parent / f"{features.name}-entities-{digest.hexdigest()[:12]}"
        encode_entity_classes(clip, classes, class_dir, ensemble=cfg.entities.ensemble, job=job)
        job.wait_for_everyone()
    conditioning = Conditioning(
        normalize=True,
        noise_variance=cfg.noise_variance,
        entity_classes=str(class_dir.resolve()) if class_dir else None,
        entity_topk=cfg.entities.top_k,
        entity_threshold=cfg.entities.threshold,
        entity_temperature=cfg.entities.temperature,
    )
    limit = cfg.entities.max_entities
    entities = [vocabulary.extract(t, limit=limit) if vocabulary else [] for t in texts]
    setup = text_only_setup(texts, store.tensor(), cfg.model, cfg.corpus, seed=cfg.train.seed,
                            generation=cfg.generation, extras=entities)  # fmt: skip
    return fit_captioner(
        cfg.train,
        setup,
        viecap_step(conditioning, setup.tokenizer, cfg),
        viecap_val_step(conditioning, setup.tokenizer, cfg, seed=cfg.train.seed),
        CheckpointCard("viecap", cfg.clip, conditioning, cfg.generation),
        run_config={"recipe": "viecap", **{k: v for k, v in asdict(cfg).items() if k != "train"}},
        resume=resume,
        progress=progress,
    )
