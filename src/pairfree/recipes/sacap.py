"""SaCap (synthesize-then-align): a captioner trained on synthetic images of the corpus.

Data (made beforehand by ``pairfree synthesize``): one synthetic image per corpus caption
(``synthesize images CORPUS``), three LLM rephrasings per caption (``synthesize rephrase
CORPUS``) and one supporting image per rephrasing (``synthesize images
REPHRASED/prompts.jsonl``). Only the corpus captions are targets, and only those whose
rephrasing parsed, as in the original. With ``synthetic.reassign`` set, each caption's own
image is the one SynC re-assigns to it (:mod:`pairfree.synth.reassign`, run as the recipe's
first stage; the worst-fitting 10 % of the captions are left out).

Objective, for each caption c:

1. re-pairing: c is paired with whichever candidate image (its own synthetic image and its
   supporting images) has the highest CLIP cosine to c's text embedding, ties at random;
2. hard prompt: the top-3 object phrases of a vocabulary by CLIP cosine to the paired image;
3. soft prompt: the paired image's normalized CLIP embedding, DeCap-projected (tau = 0.01)
   onto the memory of every corpus caption's text embedding (as the original's text
   features: also the captions that lost their rephrasing or image), through an MLP
   d -> 2048 -> 2048 -> h·10 (ReLU) into 10 prefix embeddings;
4. the decoder (GPT-2 with cross-attention to the paired image's CLIP grid features, all of
   it trained) reads ``[10 soft][hard prompt, <= 20 tokens] ":" caption "."`` and is trained
   on the caption tokens (cut at the caption's first period, which ends it).

At inference the test image's own embedding, projected onto the same memory, and its own
hard prompt are used; beam 5, at most 30 new tokens, stop at "." only (not at end-of-text:
the original passes "." as the end-of-sequence token), and a finished beam scored
as the original's transformers 4.21.2 scores it: its log-probability over a length that counts
the 31 ids of the decoder's prompt (10 soft-prompt placeholders, the hard prompt padded to 20,
":") and not the stop token, which favours shorter captions (``generation.score_length:
with_prompt``; ``new_tokens``, transformers' later fix, counts the new tokens only). ``repair``,
``hard_prompt`` and ``soft_prompt`` switch each mechanism off for ablations (no re-pairing:
the caption's own image; no hard prompt: the prompt is the separator alone; no soft prompt:
no prefix).

Training, as the original's ``training.py`` / ``train_infer.sh``: 10 epochs of a global batch
of 128 (one GPU), torch's AdamW at lr 1e-5 with its weight decay 0.01 on every parameter
(``train.no_decay = []``), linear decay after 1000 warm-up steps, every caption trained on
(``corpus.val_fraction = 0``) and every epoch's checkpoint kept (``epoch-001/``, ...).
The best epoch is the one whose captions of a real val split (``validation.dataset``; the
configs name the Karpathy val split) score the highest CIDEr; without one, a
``corpus.val_fraction`` > 0 holds captions out and their paired synthetic images are scored
instead; with neither, only ``last/`` is written.

Where pairfree differs from the original code, on purpose:

- positions: the original right-pads the hard prompt to 20 tokens and numbers positions
  0..59 in training but counts only real tokens when generating, so the caption it decodes
  sits at positions it was not trained at; here padding takes no position on either side
  (:mod:`pairfree.captioner.cross_attention`);
- the loss covers the caption and its period; the original's also covers the ":", which is
  predicted from a padding slot;
- the hard prompt comes from the paired image, as the paper describes it; the original takes
  it from the caption's own synthetic image even when another image was paired with it;
- phrases lose a final "." on both sides (the original strips it only in training);
- the shuffle differs each epoch (the original reseeds every epoch, repeating one order);
- the best epoch is chosen on a validation split; the original scores every epoch's
  checkpoint on the test split, which pairfree never selects on.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from pairfree.captioner import CheckpointCard, Conditioning, GenerationConfig, condition
from pairfree.captioner.cross_attention import CrossAttentionConfig, build_cross_attention
from pairfree.captioner.prompts import hard_prompt, top_phrases
from pairfree.clip import load_clip
from pairfree.data import Caption, CleaningConfig, clean_caption
from pairfree.data.phrases import corpus_phrases, read_phrases
from pairfree.data.training_corpus import CorpusConfig, check_corpus, prepare_corpus
from pairfree.encoding import OnlineGrids, encode_captions, encode_images
from pairfree.errors import PairfreeError, load_failure
from pairfree.features import FeatureStore, store_key
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.synth.images import synthetic_images
from pairfree.synth.reassign import ReassignConfig, training_images
from pairfree.synth.text import read_rephrasings
from pairfree.training.cross_attention import (
    GridCaptionDataset,
    GridExample,
    ValidationConfig,
    caption_target,
    check_validation,
    checkpoint_eval,
    fit_cross_attention,
)
from pairfree.training.fitting import CaptionerSetup, split_train_val
from pairfree.training.trainer import TrainConfig, TrainResult

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config
@dataclass
class SyntheticConfig:
    images: str = ""  # `synthesize images CORPUS --out ...`: the captions' own images
    rephrasings: str | None = None  # `synthesize rephrase CORPUS --out ...`
    supporting: str | None = None  # `synthesize images REPHRASED/prompts.jsonl --out ...`
    # SynC: the captions' own images as it re-assigns them, made in <output_dir>/reassigned
    reassign: ReassignConfig | None = None


@dataclass
class PhraseConfig:
    vocabulary: str | None = None  # one phrase per line; None: built from the corpus
    topk: int = 3
    max_phrases: int = 1000  # when built from the corpus


@dataclass
class SaCapConfig:
    clip: str = "hf:openai/clip-vit-base-patch32"
    features: str | None = None  # cache dir of the encodings; default <output_dir>/features
    # every caption trains, as in the original (a val_fraction > 0 holds some out, see below)
    corpus: CorpusConfig = field(
        default_factory=lambda: CorpusConfig(max_tokens=30, val_fraction=0.0)
    )
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    phrases: PhraseConfig = field(default_factory=PhraseConfig)
    repair: bool = True
    hard_prompt: bool = True
    soft_prompt: bool = True
    tau: float = 0.01  # projection temperature of the soft prompt
    seed: int = 42  # breaks re-pairing ties
    # the paired images' grid features: "store" encodes them once into a float16 feature
    # store (the original's way); "online" computes them as training reads them (no disk)
    grids: str = "store"
    model: CrossAttentionConfig = field(default_factory=CrossAttentionConfig)
    # picks the best epoch by CIDEr (the original scores every epoch on the test split)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # the original: one GPU, batch 128; torch's AdamW, whose weight decay 0.01 reaches every
    # parameter; every epoch saved
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=10, lr=1e-5, batch_size=128, warmup_steps=1000, weight_decay=0.01,
            no_decay=[], select_metric="val_CIDEr", select_mode="max", keep_epochs=True,
        )
    )  # fmt: skip
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            num_beams=5, max_new_tokens=30, stop=".", stop_at_eos=False, score_length="with_prompt"
        )
    )

    def __post_init__(self) -> None:
        if self.grids not in ("store", "online"):
            raise PairfreeError(f"grids must be store or online, not {self.grids!r}")


# --------------------------------------------------------------------------- data
def rephrasings(
    folder: str | None, cleaning: CleaningConfig, job: Job
) -> dict[str, list[str]] | None:
    """Caption (cleaned as the corpus is) -> its rephrasings (those whose answer parsed)."""
    if folder is None:
        return None
    records = read_rephrasings(Path(folder) / "rephrasings.jsonl", job.skip_log)
    return {clean_caption(caption, cleaning): texts for caption, texts in records.items()}


def repair(
    caption_embeds: torch.Tensor,
    candidate_embeds: torch.Tensor,
    candidates: list[list[int]],
    generator: torch.Generator,
) -> list[int]:
    """For each caption, the candidate image row of highest cosine to its text embedding;
    ties are broken uniformly at random."""
    text = F.normalize(caption_embeds.float(), dim=-1)
    images = F.normalize(candidate_embeds.float(), dim=-1)
    chosen = []
    for i, rows in enumerate(candidates):
        sims = images[rows] @ text[i]
        best = (sims == sims.max()).nonzero().flatten()
        pick = best[torch.randint(len(best), (1,), generator=generator)] if len(best) > 1 else best
        chosen.append(rows[int(pick)])
    return chosen


def phrase_vocabulary(cfg: SaCapConfig, texts: list[str]) -> list[str]:
    if cfg.phrases.vocabulary:
        return read_phrases(cfg.phrases.vocabulary)
    phrases = corpus_phrases(texts, max_phrases=cfg.phrases.max_phrases)
    if not phrases:
        raise PairfreeError("no object phrase occurs twice in the corpus; give phrases.vocabulary")
    return phrases


# --------------------------------------------------------------------------- examples
@dataclass
class SaCapData:
    """What SaCap trains on, per target caption: its candidate images, the one it is paired
    with, and the example (condition, grid, hard prompt, caption) made from that image."""

    texts: list[str]  # the target captions
    candidates: list[list[Path]]  # each caption's own synthetic image, then its supporting ones
    paired: list[Path]  # the candidate each caption is paired with
    prompts: list[str]  # the paired image's hard prompt ("" without hard prompts)
    conditioning: Conditioning  # how the soft prompt's input was made (and is at inference)
    data: GridCaptionDataset
    embed_dim: int
    grid_width: int


def sacap_data(cfg: SaCapConfig, clip, tokenizer, job: Job) -> SaCapData:
    """Read the synthetic data, re-pair each caption, and build its training example."""
    features = Path(cfg.features) if cfg.features else Path(cfg.train.output_dir) / "features"
    # targets: corpus captions with an image of their own (and rephrasings, when given)
    cleaning = cfg.corpus.cleaning
    folder = training_images(cfg.synthetic.images, cfg.synthetic.reassign,
                             Path(cfg.train.output_dir) / "reassigned", job=job, clip=clip,
                             clip_spec=cfg.clip)  # fmt: skip
    own = synthetic_images(folder, "images", cleaning, job)
    support = {} if cfg.synthetic.supporting is None else synthetic_images(
        cfg.synthetic.supporting, "supporting", cleaning, job)  # fmt: skip
    rephrased = rephrasings(cfg.synthetic.rephrasings, cleaning, job)
    corpus = list(dict.fromkeys(c.text for c in prepare_corpus(cfg.corpus, job.skip_log)))
    texts = [t for t in corpus if t in own and (rephrased is None or t in rephrased)]
    if not texts:
        raise PairfreeError(f"no corpus caption of {cfg.corpus.path} has a synthetic image in "
                            f"{folder}")  # fmt: skip

    # candidate images: each caption's own, then its supporting images
    files, candidates = [], []
    for text in texts:
        rows = [len(files)]
        files.append(own[text])
        for rephrasing in (rephrased or {}).get(text, []):
            rephrasing = clean_caption(rephrasing, cleaning)
            if rephrasing in support:
                rows.append(len(files))
                files.append(support[rephrasing])
        candidates.append(rows)
    ids = [f"{i:09d}" for i in range(len(files))]
    # the projection memory: every corpus caption, as the original's text features hold the
    # whole training corpus (also the captions that lost their rephrasing or image)
    memory_captions = [Caption(t, None, cfg.corpus.path, None) for t in corpus]
    encode_captions(clip, memory_captions, features / "captions", job=job)
    # stores named by what they hold: SaCap on SynC's re-assigned images shares the cache
    images_dir = features / f"images-{store_key(str(f) for f in files)}"
    encode_images(clip, list(zip(ids, files, strict=True)), images_dir, job=job)
    job.wait_for_everyone()
    memory_store, image_store = (
        FeatureStore(features / "captions"),
        FeatureStore(images_dir),
    )
    keep = [i for i, rows in enumerate(candidates) if ids[rows[0]] in image_store]
    memory = memory_store.tensor()
    image_embeds = image_store.tensor()

    # 1. re-pairing
    generator = torch.Generator().manual_seed(cfg.seed)
    usable = [
        [image_store.row(ids[r]) for r in candidates[i] if ids[r] in image_store] for i in keep
    ]
    caption_embeds = memory[[memory_store.text_row(texts[i]) for i in keep]]
    if cfg.repair:
        paired = repair(caption_embeds, image_embeds, usable, generator)
    else:
        paired = [rows[0] for rows in usable]  # the caption's own image
    paired_embeds = image_embeds[paired]
    to_grid = [(image_store.ids[r], files[int(image_store.ids[r])]) for r in sorted(set(paired))]
    if cfg.grids == "online":
        grids: FeatureStore | OnlineGrids = OnlineGrids(clip, to_grid)
    else:
        grid_dir = features / f"grid-{store_key(f'{i} {f}' for i, f in to_grid)}"  # per pairing
        encode_images(clip, to_grid, grid_dir, grid=True, dtype="float16", job=job)
        job.wait_for_everyone()
        grids = FeatureStore(grid_dir)

    # 2. hard prompts: the paired image's top phrases
    phrase_dir = None
    prompts = [""] * len(keep)
    if cfg.hard_prompt:
        vocabulary = phrase_vocabulary(cfg, [texts[i] for i in keep])
        phrase_dir = features / f"phrases-{store_key(vocabulary)}"
        encode_captions(clip, [Caption(p, None, "phrases", None) for p in vocabulary], phrase_dir,
                        job=job)  # fmt: skip
        job.wait_for_everyone()
        phrase_store = FeatureStore(phrase_dir)
        chosen = top_phrases(paired_embeds, phrase_store.tensor(), phrase_store.texts or [],
                             cfg.phrases.topk)  # fmt: skip
        prompts = [hard_prompt(p) for p in chosen]

    # 3. soft prompts: the paired image's embedding projected onto the caption memory
    conditioning = Conditioning(
        normalize=True,
        project_to=str((features / "captions").resolve()) if cfg.soft_prompt else None,
        tau=cfg.tau,
        project_in_training=cfg.soft_prompt,
        prompt_phrases=str(phrase_dir.resolve()) if phrase_dir else None,
        prompt_topk=cfg.phrases.topk,
    )
    conditions = condition(paired_embeds, conditioning, training=True, memory=memory)

    # 4. the examples
    target_ids = tokenizer([caption_target(texts[i]) for i in keep], add_special_tokens=False)
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    examples = [
        GridExample(
            conditions[k],
            grids.row(image_store.ids[paired[k]]),
            prompt_ids[k],
            target_ids["input_ids"][k][: cfg.corpus.max_tokens],
        )
        for k in range(len(keep))
    ]
    file_of = {r: files[int(image_store.ids[r])] for r in range(len(image_store.ids))}
    return SaCapData(
        texts=[texts[i] for i in keep],
        candidates=[[file_of[r] for r in rows] for rows in usable],
        paired=[file_of[r] for r in paired],
        prompts=prompts,
        conditioning=conditioning,
        data=GridCaptionDataset(examples, grids),
        embed_dim=image_embeds.shape[1],
        grid_width=grids[0].shape[-1],
    )


# --------------------------------------------------------------------------- training
def check_sacap(cfg: SaCapConfig) -> None:
    """Refuse what is missing or wrong before CLIP or the LM loads."""
    check_corpus(cfg.corpus)
    check_validation(cfg.validation)
    if not cfg.synthetic.images:
        raise PairfreeError("synthetic.images is not set: the captions' synthetic images")
    for key in ("images", "rephrasings", "supporting"):
        folder = getattr(cfg.synthetic, key)
        if folder and not Path(folder).is_dir():
            raise PairfreeError(f"synthetic.{key}: {folder} does not exist (see `pairfree "
                                "synthesize --help`)")  # fmt: skip
    if cfg.hard_prompt and cfg.phrases.vocabulary:
        read_phrases(cfg.phrases.vocabulary)  # a bad vocabulary fails before any encoding


@register_recipe("sacap", SaCapConfig)
def train_sacap(cfg: SaCapConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """SaCap: a cross-attention captioner on re-paired synthetic images, soft and hard prompts."""
    check_sacap(cfg)
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.lm)
    except OSError as err:
        raise load_failure(f"model.lm={cfg.model.lm!r}", cfg.model.lm, err) from err
    made = sacap_data(cfg, clip, tokenizer, job)
    job.log_skips()
    model, _ = build_cross_attention(
        cfg.model if cfg.soft_prompt else replace(cfg.model, prefix_length=0),
        embed_dim=made.embed_dim,
        grid_width=made.grid_width,
        seed=cfg.train.seed,
        tokenizer=tokenizer,
    )
    train_idx, val_idx = split_train_val(len(made.data), cfg.corpus.val_fraction, cfg.train.seed)
    logger.info("sacap: %d captions, %d re-paired to a supporting image", len(made.texts),
                sum(p != c[0] for p, c in zip(made.paired, made.candidates, strict=True)))  # fmt: skip

    # the best checkpoint: by CIDEr on the real val split when given, else on the held-out
    # captions' paired synthetic images; never on the test split (the original's way)
    held_out = ([made.paired[i] for i in val_idx], [made.texts[i] for i in val_idx])
    evaluate = checkpoint_eval(cfg.validation, held_out, clip, tokenizer, cfg.generation,
                               conditioning=made.conditioning, job=job, recipe="sacap")  # fmt: skip
    return fit_cross_attention(
        cfg.train,
        CaptionerSetup(model, tokenizer, made.data.subset(train_idx), made.data.subset(val_idx)),
        CheckpointCard("sacap", cfg.clip, made.conditioning, cfg.generation),
        run_config={
            "recipe": "sacap",
            **{k: v for k, v in asdict(cfg).items() if k != "train"},
            "model": asdict(model.config),
        },  # fmt: skip
        resume=resume,
        progress=progress,
        evaluate=evaluate,
    )
