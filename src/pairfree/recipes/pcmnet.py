"""PCM-Net (Luo et al., ECCV 2024): a captioner trained from scratch on one synthetic image per
corpus caption, with a patch-wise cross-modal mix-up and a CLIP-weighted cross-entropy.

Data (made beforehand by ``pairfree synthesize images CORPUS``): each corpus caption's
synthetic image, its global CLIP embedding and CLIP grid; with ``reassign:`` set, the image
SynC re-assigns to it (:mod:`pairfree.synth.reassign`, run as the recipe's first stage, the
worst-fitting 10 % of the pairs left out). Objective, for each caption c and its image I:

1. **mix-up** (:mod:`pairfree.captioner.patch_mix`): the 5 concepts of a concept vocabulary
   (the original's: 446 COCO nouns, prompt-ensembled) most similar to I; the 5 (patch,
   concept) pairs of highest cosine pick the patches that are replaced by their concepts'
   softmax(cos / 0.01)-weighted text embeddings (on real test images these stand-ins are
   appended instead);
2. **the captioner** (:mod:`pairfree.captioner.pcm`): 3 encoder and 3 decoder layers, width
   512, over [I's global embedding, noised as CapDec's (variance 0.016); the mixed patches],
   predicting c's words from a word-level vocabulary built from the corpus;
3. **CLIP-weighted cross-entropy**: label-smoothed (0.1) token cross-entropy weighted by
   w(I, c) = clamp(alpha * cos(I, c), 0, 1) (alpha 2.5 for ViT-B/32, 4.0 for ViT-L/14), times
   the batch's mean (1 - p_target)^2 over its tokens (the original's default ``gamma_type:
   batch``, which its paper does not describe), so a synthetic image that fits its caption
   poorly teaches less.

Training as ``configs/mscoco_sd/vit_b32/train.yaml``: batch 32, 12 epochs, Adam (no weight
decay), the Noam schedule (peak (512 * 10000)^-0.5 after 10000 warm-up steps, then 1/sqrt),
gradients clipped by value at 0.1; beam 3, at most 20 words. The original selects no
checkpoint on a validation split (it scores every epoch on the test split); here the last
epoch is the model unless ``validation.dataset`` names real val images.

Ablations: ``mixup: false`` (the patches as they are), ``weighting: false`` (every caption
weighs 1; the focal factor stays). Where pairfree differs on purpose: the word vocabulary is
built here from the training corpus (words seen ``min_word_count`` times; the original ships
its 10199-word file and not the threshold); unknown words are ``<unk>``; the concept
embeddings are pairfree's prompt ensemble (ViECap's templates; the original's are not
published); beam search is Hugging Face's scored by summed log-probability (length penalty 0;
the original keeps finished beams in the beam); see also :mod:`pairfree.captioner.pcm`.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerFast

from pairfree.captioner import CheckpointCard, Conditioning, GenerationConfig, condition
from pairfree.captioner.entities import read_entity_list
from pairfree.captioner.pcm import PCMCaptioner, PCMConfig, clip_weighted_loss, grid_inputs
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import Caption
from pairfree.data.training_corpus import CorpusConfig, check_corpus, prepare_corpus
from pairfree.encoding import encode_captions, encode_entity_classes, encode_images
from pairfree.errors import PairfreeError, first_line
from pairfree.features import FeatureStore, store_key
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.synth.images import synthetic_images
from pairfree.synth.reassign import ReassignConfig, training_images
from pairfree.tokenizers import word_tokenizer, word_vocabulary, words
from pairfree.training.cross_attention import (
    ValidationConfig,
    check_validation,
    checkpoint_eval,
)
from pairfree.training.fitting import CaptionerSetup, fit_captioner, pad_ids, split_train_val
from pairfree.training.trainer import StepFn, TrainConfig, TrainResult, ValFn

logger = logging.getLogger(__name__)


@dataclass
class ConceptConfig:
    vocabulary: str | None = None  # one concept per line (a JSON list, COCO instances); required
    ensemble: bool = True  # embed each as its prompt ensemble's mean (the original's files)


@dataclass
class PCMNetConfig:
    clip: str = "hf:openai/clip-vit-base-patch32"
    features: str | None = None  # cache dir of the encodings; default <output_dir>/features
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(val_fraction=0.0))
    images: str = ""  # `pairfree synthesize images CORPUS --out ...`: one image per caption
    # SynC: train on its re-assignment of `images`, made in <output_dir>/reassigned
    reassign: ReassignConfig | None = None
    concepts: ConceptConfig = field(default_factory=ConceptConfig)
    min_word_count: int = 5  # words seen fewer times in the corpus are <unk>
    mixup: bool = True  # false: the "no mix-up" ablation
    weighting: bool = True  # false: the "no CLIP weighting" ablation
    alpha: float = 2.5  # w = clamp(alpha * cos, 0, 1): 2.5 for ViT-B/32, 4.0 for ViT-L/14
    label_smoothing: float = 0.1
    gamma: float = 2.0  # the batch's focal factor (0: none)
    noise_variance: float = 0.016  # on the global embedding, in training
    model: PCMConfig = field(default_factory=PCMConfig)  # sizes are filled from the data
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=12, batch_size=32, lr=(512 * 10000) ** -0.5, warmup_steps=10000,
            schedule="noam", weight_decay=0.0, grad_clip=0.1, grad_clip_mode="value",
            select_metric="val_CIDEr", select_mode="max",
        )
    )  # fmt: skip
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            num_beams=3, max_new_tokens=20, stop=None, stop_at_eos=True, length_penalty=0.0
        )
    )

    def __post_init__(self) -> None:
        if self.min_word_count < 1 or self.alpha <= 0 or self.gamma < 0:
            raise PairfreeError(f"min_word_count must be >= 1, alpha > 0 and gamma >= 0, not "
                                f"{self.min_word_count}, {self.alpha}, {self.gamma}")  # fmt: skip
        if not 0 <= self.label_smoothing < 1 or self.noise_variance < 0:
            raise PairfreeError(f"label_smoothing must be in [0, 1) and noise_variance >= 0, "
                                f"not {self.label_smoothing}, {self.noise_variance}")  # fmt: skip


# --------------------------------------------------------------------------- data
class SyntheticPairs(Dataset):
    """(global embedding, grid, weight, caption word ids) per caption and its image."""

    def __init__(
        self,
        embeds: torch.Tensor,
        grids: FeatureStore,
        grid_rows: list[int],
        weights: torch.Tensor,
        captions: list[list[int]],
    ) -> None:
        self.embeds, self.grids, self.grid_rows = embeds, grids, grid_rows
        self.weights, self.captions = weights, captions

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> tuple:
        grid = torch.from_numpy(self.grids[self.grid_rows[i]])
        return self.embeds[i], grid, self.weights[i], self.captions[i]

    def subset(self, indices: list[int]) -> SyntheticPairs:
        return SyntheticPairs(self.embeds[indices], self.grids,
                              [self.grid_rows[i] for i in indices], self.weights[indices],
                              [self.captions[i] for i in indices])  # fmt: skip


def collate(batch: list[tuple]) -> tuple[torch.Tensor, ...]:
    """Stack; the decoder reads the start token (id 0, ".") then the caption, and predicts
    the caption then its end (id 0); targets are -100 past it."""
    embeds, grids, weights, captions = zip(*batch, strict=True)
    targets, mask = pad_ids(captions, 0)
    inputs = torch.cat((torch.zeros(len(batch), 1, dtype=torch.long), targets[:, :-1]), dim=1)
    return (torch.stack(embeds), torch.stack(grids).float(), torch.stack(weights), inputs,
            targets.masked_fill(mask == 0, -100))  # fmt: skip


@dataclass
class PCMData:
    """What PCM-Net trains on: the captions with a synthetic image, their images, the
    examples, the word tokenizer and the concept embeddings."""

    texts: list[str]
    files: list[Path]
    data: SyntheticPairs
    tokenizer: PreTrainedTokenizerFast
    concepts: torch.Tensor


def pcm_data(cfg: PCMNetConfig, clip: ClipEncoder, job: Job) -> PCMData:
    """Read the synthetic images (SynC's re-assignment of them, with ``reassign``), encode
    them (embeddings, grids), weigh each pair, and build the word vocabulary and the concept
    embeddings."""
    features = Path(cfg.features) if cfg.features else Path(cfg.train.output_dir) / "features"
    folder = training_images(cfg.images, cfg.reassign, Path(cfg.train.output_dir) / "reassigned",
                             job=job, clip=clip, clip_spec=cfg.clip)  # fmt: skip
    own = synthetic_images(folder, "images", cfg.corpus.cleaning, job)
    corpus = list(dict.fromkeys(c.text for c in prepare_corpus(cfg.corpus, job.skip_log)))
    texts = [t for t in corpus if t in own]
    if not texts:
        raise PairfreeError(f"no corpus caption of {cfg.corpus.path} has a synthetic image in "
                            f"{folder}")  # fmt: skip
    files = [own[t] for t in texts]
    pairs = [(f"{i:09d}", f) for i, f in enumerate(files)]
    digest = store_key(str(f) for f in files)
    captions_dir = features / f"captions-{store_key(texts)}"  # its own: SaCap's holds the corpus
    encode_captions(clip, [Caption(t, None, cfg.corpus.path, None) for t in texts], captions_dir,
                    job=job)  # fmt: skip
    encode_images(clip, pairs, features / f"images-{digest}", job=job)
    encode_images(clip, pairs, features / f"grid-{digest}", grid=True, dtype="float16", job=job)
    concepts = read_entity_list(cfg.concepts.vocabulary)
    concept_dir = features / f"concepts-{store_key([str(cfg.concepts.ensemble), *concepts])}"
    encode_entity_classes(clip, concepts, concept_dir, ensemble=cfg.concepts.ensemble, job=job)
    job.wait_for_everyone()
    images, grids = (
        FeatureStore(features / f"images-{digest}"),
        FeatureStore(features / f"grid-{digest}"),
    )
    text_store = FeatureStore(captions_dir)
    keep = [i for i, (image_id, _) in enumerate(pairs) if image_id in images]  # readable ones
    embeds = images.tensor()[[images.row(pairs[i][0]) for i in keep]]
    caption_embeds = text_store.tensor()[[text_store.text_row(texts[i]) for i in keep]]
    cosine = (F.normalize(embeds, dim=-1) * F.normalize(caption_embeds, dim=-1)).sum(-1)
    weights = (cfg.alpha * cosine).clamp(0, 1) if cfg.weighting else torch.ones(len(keep))
    kept = [texts[i] for i in keep]
    tokenizer = word_tokenizer(word_vocabulary(kept, min_count=cfg.min_word_count))
    ids = tokenizer([" ".join(words(t)) for t in kept], add_special_tokens=False)["input_ids"]
    end, limit = tokenizer.eos_token_id, cfg.model.max_tokens - 1
    data = SyntheticPairs(embeds, grids, [grids.row(pairs[i][0]) for i in keep], weights,
                          [x[:limit] + [end] for x in ids])  # fmt: skip
    return PCMData(kept, [files[i] for i in keep], data, tokenizer,
                   FeatureStore(concept_dir).tensor())  # fmt: skip


# --------------------------------------------------------------------------- objective
def pcm_step(clip: ClipEncoder, conditioning: Conditioning, cfg: PCMNetConfig) -> StepFn:
    """The CLIP-weighted, label-smoothed cross-entropy of the caption given its synthetic
    image, the global embedding noised, the patches mixed with concepts."""

    def step(ctx, batch):
        embeds, grid, weights, inputs, targets = batch
        noised = condition(embeds, conditioning, training=True).to(embeds.dtype)
        grid, dense = grid_inputs(grid, clip.embed_grid, ctx.unwrap("captioner").config)
        logits = ctx.modules["captioner"](embeds, noised, grid, dense, inputs)
        loss = clip_weighted_loss(logits, targets, weights, smoothing=cfg.label_smoothing,
                                  gamma=cfg.gamma)  # fmt: skip
        ctx.optimize("captioner", loss)
        return {"loss": loss.detach()}

    return step


def pcm_val_step(clip: ClipEncoder) -> ValFn:
    """Length-normalized caption negative log-likelihood, as the captioner reads a test
    image (the stand-ins appended)."""

    def val_step(ctx, batch):
        embeds, grid, _, inputs, targets = batch
        model = ctx.unwrap("captioner")
        grid, dense = grid_inputs(grid, clip.embed_grid, model.config)
        logits = model(embeds, F.normalize(embeds, dim=-1), grid, dense, inputs)
        real = targets != -100
        logp = torch.log_softmax(logits.float(), -1).gather(-1, targets.clamp(min=0)[..., None])
        return {"val_loss": -(logp[..., 0] * real).sum(1) / real.sum(1)}

    return val_step


def pooled_patches(clip: ClipEncoder, k: int) -> int:
    """How many patches the captioner reads of ``clip``'s grid pooled k x k; a grid that
    cannot be pooled so (not square, or a head that positions its tokens, as a ResNet's
    attention pool does) is refused before any data is read."""
    probe = torch.zeros(1, *clip.grid_shape)
    config = PCMConfig(class_tokens=clip.grid_class_tokens, grid_pool=k)
    try:
        pooled, _ = grid_inputs(probe, clip.embed_grid, config)
    except (ValueError, RuntimeError) as err:
        raise PairfreeError(f"model.grid_pool {k}: the grid of {clip.name} cannot be "
                            f"pooled so ({first_line(err)})") from None  # fmt: skip
    return pooled.shape[1] - clip.grid_class_tokens


@register_recipe("pcmnet", PCMNetConfig)
def train_pcmnet(cfg: PCMNetConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """PCM-Net: a transformer captioner on synthetic images with patch-wise cross-modal
    mix-up and the CLIP-weighted cross-entropy."""
    check_corpus(cfg.corpus)
    check_validation(cfg.validation)
    if not cfg.images or not Path(cfg.images).is_dir():
        raise PairfreeError(f"images: {cfg.images or '(not set)'} is not a folder of synthetic "
                            "images (run `pairfree synthesize images CORPUS --out ...`)")  # fmt: skip
    if not cfg.concepts.vocabulary:
        raise PairfreeError("concepts.vocabulary is not set: the concept words, one per line")
    read_entity_list(cfg.concepts.vocabulary)  # a bad file fails before any model loads
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    patches = pooled_patches(clip, cfg.model.grid_pool)
    made = pcm_data(cfg, clip, job)
    job.log_skips()
    sizes = {
        "vocab_size": len(made.tokenizer), "embed_dim": clip.embed_dim,
        "grid_width": clip.grid_shape[1], "class_tokens": clip.grid_class_tokens,
        "grid_tokens": patches, "concepts": len(made.concepts),
    }  # fmt: skip
    config = replace(cfg.model, **sizes, mix=cfg.model.mix if cfg.mixup else None)
    torch.manual_seed(cfg.train.seed)  # the initialization is part of the run
    model = PCMCaptioner(config)
    model.set_concepts(made.concepts)
    logger.info("pcmnet: %d captions with a synthetic image, %d words, %d concepts, mean "
                "weight %.3f", len(made.texts), len(made.tokenizer), len(made.concepts),
                float(made.data.weights.mean()))  # fmt: skip

    data, tokenizer = made.data, made.tokenizer
    train_idx, val_idx = split_train_val(len(data), cfg.corpus.val_fraction, cfg.train.seed)
    conditioning = Conditioning(normalize=True, noise_variance=cfg.noise_variance)
    held_out = ([made.files[i] for i in val_idx], [made.texts[i] for i in val_idx])
    evaluate = checkpoint_eval(cfg.validation, held_out, clip, tokenizer, cfg.generation,
                               conditioning=conditioning, job=job, recipe="pcmnet")  # fmt: skip
    return fit_captioner(
        cfg.train,
        CaptionerSetup(model, tokenizer, data.subset(train_idx), data.subset(val_idx)),
        pcm_step(clip, conditioning, cfg),
        pcm_val_step(clip),
        CheckpointCard("pcmnet", cfg.clip, conditioning, cfg.generation),
        run_config={
            "recipe": "pcmnet",
            **{k: v for k, v in asdict(cfg).items() if k != "train"},
            "model": asdict(config),
        },  # fmt: skip
        resume=resume,
        progress=progress,
        collate=collate,
        evaluate=evaluate,
    )
