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

from dataclasses import asdict, dataclass, field
from pathlib import Path

from pairfree.captioner import CaptionerConfig, CheckpointCard, Conditioning, GenerationConfig
from pairfree.clip import load_clip
from pairfree.data.cleaning import CleaningConfig
from pairfree.data.training_corpus import CorpusConfig, check_corpus
from pairfree.encoding import encode_corpus
from pairfree.errors import PairfreeError
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.training.entity_prompts import (
    EntityConfig,
    PromptedCaption,
    entity_classifier,
    entity_vocabulary,
    fit_entity_prompted,
    noised_soft_prompt,
)
from pairfree.training.text_only import text_only_setup
from pairfree.training.trainer import TrainConfig, TrainResult


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


@register_recipe("viecap", ViECapConfig)
def train_viecap(cfg: ViECapConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """ViECap: text-only training with a noised soft prompt and an entity-aware hard prompt."""
    check_corpus(cfg.corpus)
    vocabulary = entity_vocabulary(cfg.entities) if cfg.hard_prompt else None
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    features = Path(cfg.features) if cfg.features else Path(cfg.train.output_dir) / "features"
    store = encode_corpus(clip, cfg.corpus, features, job)
    texts = store.texts
    job.log_skips()

    classifier = entity_classifier(cfg.entities, clip, features, job) if vocabulary else {}
    conditioning = Conditioning(normalize=True, noise_variance=cfg.noise_variance, **classifier)
    limit = cfg.entities.max_entities
    extras = [PromptedCaption(vocabulary.extract(t, limit=limit) if vocabulary else [])
              for t in texts]  # fmt: skip
    setup = text_only_setup(texts, store.tensor(), cfg.model, cfg.corpus, seed=cfg.train.seed,
                            generation=cfg.generation, extras=extras)  # fmt: skip
    return fit_entity_prompted(
        cfg.train,
        setup,
        noised_soft_prompt(conditioning),
        cfg.entities,
        hard_prompt=cfg.hard_prompt,
        card=CheckpointCard("viecap", cfg.clip, conditioning, cfg.generation),
        run_config={"recipe": "viecap", **{k: v for k, v in asdict(cfg).items() if k != "train"}},
        resume=resume,
        progress=progress,
    )
