"""ICSD: a captioner trained on multi-context synthetic images of grouped, summarized captions.

From a caption corpus alone, in stages that are each cached and resumable (under
``<synthesis.out>``, default ``<train.output_dir>/synthetic``):

1. group: every caption of the corpus (a repeated one as often as it occurs, as ICSD groups
   every annotation) with its 29 nearest captions by the text cosine of ICSD's grouping CLIP,
   ViT-B/16 (``synthesis.group_clip``; null: the run's CLIP) (``groups/``);
2. select and summarize: an LLM picks the captions of each group that describe one scene and
   writes one summary of at most 50 words (``summaries/``, ICSD's prompt; answers that do not
   parse are dropped and kept in ``rejects.jsonl``);
3. one image per summary with Stable Diffusion (ICSD: SD 1.4, DPM-Solver, 20 steps, 512²)
   (``images/``); images the safety checker flags are left out;
4. optionally single-context images, one per corpus caption (``single/``), for the mix;
   with ``synthesis.reassign`` set, SynC re-assigns their captions (``single-reassigned/``,
   :mod:`pairfree.synth.reassign`), and its kept pairs are the single-context pairs.

Objective: every *selected* caption is paired with its group's image (and only with it); a
``single_context`` share of the corpus captions is also paired with an image of its own. The
captioner is ICSD's (BLIP's): the CLIP image tower, fine-tuned by default
(``freeze_image_encoder``), whose grid tokens a text decoder with cross-attention reads (BERT,
as BLIP's MED decoder is; GPT-2 with cross-attention works too); the decoder reads
``[CLS] a picture of`` and is trained on the caption tokens and ``[SEP]`` only, by
cross-entropy with label smoothing 0.1 (``label_smoothing``, BLIP's ``med.py``). The decoder's
pretrained weights are its encoder's: the output head's transform and bias start anew, as
BLIP's ``BertLMHeadModel`` built from its config and given a pretrained ``bert`` only does
(``pretrained_head: true`` keeps BERT's MLM head; not measured: the world's BERT is untrained).
The tower reads ``image_size`` = 384 px, as ICSD's ``clip-vit-base-patch32-384px``: the copy's
position embeddings are resized from 7x7 to 12x12 patches (bicubic, the class token's kept,
145 grid tokens) and trained from there; the size is saved with the checkpoint, so captioning
reads the same (``image_size: null`` keeps the tower's own, as the world's 64-px CNN must).
Images are augmented (a random crop of 50-100 % of the area at that size, a random flip, CLIP
normalization). AdamW lr 1e-5, weight decay 0.05 on every parameter, cosine decay over 30
epochs; validation every 500 steps by CIDEr + BLEU-4 of beam-3 captions, which picks the best
checkpoint, as the original does. A finished beam is scored as BLIP's
transformers (before 4.36) scores it: its log-probability over a length that counts the 4
prompt ids and not the ``[SEP]`` that ended it (``generation.score_length: with_prompt``;
``new_tokens`` counts the new tokens only, as transformers has since).

Where pairfree differs from the original code, on purpose:

- validation: the original scores the real Karpathy val split; here ``validation.dataset``
  does that when given, and otherwise the held-out share of the synthetic images is scored
  against their groups' selected captions (no human-paired data at all);
- the decoder's first token is the tokenizer's own ``[CLS]`` (BLIP adds a new ``[DEC]`` token,
  randomly initialized);
- the learning rate follows the cosine per step (the original sets it once per epoch);
- decoding stops at 26 new tokens, which is BLIP's total length 30 less the 4 prompt tokens;
  its minimum length of 5 (one new token) is not enforced;
- grid tokens come after the tower's final layer norm (as everywhere in pairfree); BLIP reads
  the last hidden state before it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from PIL import Image

from pairfree.captioner import CheckpointCard, Conditioning, GenerationConfig
from pairfree.captioner.cross_attention import CrossAttentionConfig, build_cross_attention
from pairfree.clip import load_clip
from pairfree.data import Caption, dataset_images
from pairfree.data.training_corpus import CorpusConfig, check_corpus, prepare_corpus
from pairfree.errors import BadInputError, PairfreeError, first_line
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.synth.llm import LLMConfig
from pairfree.synth.reassign import ReassignConfig, training_images
from pairfree.synth.shards import write_jsonl
from pairfree.synth.stages import ImageSynthesisConfig, draw_images, summarize
from pairfree.synth.text import Group, group_corpus, read_summaries
from pairfree.training.cross_attention import (
    ImageCaptionDataset,
    ImageExample,
    ValidationConfig,
    caption_score_eval,
    check_validation,
    fit_cross_attention,
    validation_images,
)
from pairfree.training.fitting import CaptionerSetup, split_train_val
from pairfree.training.trainer import TrainConfig, TrainResult

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------- config
def icsd_images() -> ImageSynthesisConfig:
    """ICSD's diffusion: SD 1.4 with DPM-Solver, 20 steps, 512 px, fp16; one image per
    prompt, and the images the safety checker flagged left out, as its training skips them."""
    return ImageSynthesisConfig(scheduler="DPMSolverMultistepScheduler", height=512, width=512,
                                dtype="float16", backend="diffusers:CompVis/stable-diffusion-v1-4")  # fmt: skip


def icsd_llm() -> LLMConfig:
    """ICSD asked ChatGPT with its defaults (temperature 1, top-p 1), 500 new tokens."""
    return LLMConfig(spec="openai:gpt-3.5-turbo", temperature=1.0, top_p=1.0, max_new_tokens=500,
                     batch_size=8)  # fmt: skip


@dataclass
class SynthesisConfig:
    out: str | None = None  # default <train.output_dir>/synthetic
    group_size: int = 30  # captions per group, the anchor included
    # the CLIP whose text embeddings group the captions (ICSD's: ViT-B/16); None: the run's
    group_clip: str | None = "hf:openai/clip-vit-base-patch16"
    index: str = "exact"  # "exact" | "faiss" (large corpora)
    dedup: bool = False  # leave out groups identical to an earlier one (ICSD keeps them)
    llm: LLMConfig = field(default_factory=icsd_llm)
    images: ImageSynthesisConfig = field(default_factory=icsd_images)
    multi_context: bool = True  # pair the selected captions with their group's image
    single_context: float = 0.0  # share of the corpus captions also paired with their own image
    # SynC on the single-context images: each caption paired with the image it re-assigns
    reassign: ReassignConfig | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.single_context <= 1:
            raise PairfreeError(f"single_context is a share, 0 to 1, not {self.single_context}")
        if not self.multi_context and not self.single_context > 0:
            raise PairfreeError("no training pairs: set multi_context or single_context")
        if self.images.variants != 1:
            raise PairfreeError(f"ICSD draws one image per prompt; images.variants must be 1, "
                                f"not {self.images.variants}")  # fmt: skip


@dataclass
class ICSDConfig:
    clip: str = "hf:openai/clip-vit-base-patch32"
    features: str | None = None  # the grouping CLIP's corpus embeddings; default <out>/features
    corpus: CorpusConfig = field(default_factory=lambda: CorpusConfig(max_tokens=40))
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    max_words: int = 30  # captions are cut to this many words (ICSD's pre_caption)
    freeze_image_encoder: bool = False  # ICSD fine-tunes it
    image_encoder_lr: float | None = None  # None: train.lr, as ICSD (one lr for everything)
    augment: bool = True  # random crops and flips (False: training images are resized only)
    min_scale: float = 0.5  # the random crop keeps 50-100 % of the image
    # the side of the images the tower reads in training and captioning (ICSD's 384: ViT-B/32
    # with resized position embeddings, 145 grid tokens); None: the tower's own (224 for it)
    image_size: int | None = 384
    label_smoothing: float = 0.1  # of the decoder's loss, as BLIP's
    pretrained_head: bool = False  # keep BERT's MLM head transform (BLIP starts it anew)
    model: CrossAttentionConfig = field(
        default_factory=lambda: CrossAttentionConfig(
            lm="bert-base-uncased", prefix_length=0, separator="[CLS] a picture of"
        )
    )
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    # the original's batch is 64 per process on every GPU (its scripts assume 8): 512 a step
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=30, lr=1e-5, batch_size=512, warmup_steps=0, schedule="cosine",
            weight_decay=0.05, no_decay=[], eval_every=500, checkpoint_every=500,
            select_metric="val_CIDEr+BLEU_4", select_mode="max",
        )
    )  # fmt: skip
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            num_beams=3, max_new_tokens=26, stop="[SEP]", score_length="with_prompt"
        )
    )

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= 1:
            raise PairfreeError(f"min_scale is the crop's smallest share of the image, in "
                                f"(0, 1], not {self.min_scale}")  # fmt: skip
        if self.image_encoder_lr is not None and not self.image_encoder_lr > 0:
            raise PairfreeError(
                f"image_encoder_lr must be > 0 (or null), not {self.image_encoder_lr}"
            )
        if self.max_words < 1:
            raise PairfreeError(f"max_words must be at least 1, not {self.max_words}")
        if not 0 <= self.label_smoothing < 1:
            raise PairfreeError(f"label_smoothing must be in [0, 1), not {self.label_smoothing}")


# --------------------------------------------------------------------------- data
def pre_caption(text: str, max_words: int) -> str:
    """A caption as ICSD trains on it: lower case, ``.!"()*#:;~`` turned into spaces, at most
    ``max_words`` words."""
    text = re.sub(r"[.!\"()*#:;~]", " ", text.lower())
    return " ".join(text.split()[:max_words])


def group_stage(
    cfg: ICSDConfig, clip, texts: list[str], out: Path, features: Path, job: Job
) -> list[Group]:
    """Stage 1 (:func:`~pairfree.synth.text.group_corpus`): the grouping CLIP
    (``synthesis.group_clip``, else the run's ``clip``) loads only if the groups are not there."""
    s = cfg.synthesis
    spec = s.group_clip or clip.name
    load = (
        (lambda: load_clip(s.group_clip, device=job.state.device))
        if s.group_clip
        else (lambda: clip)
    )
    captions = [Caption(t, None, cfg.corpus.path, None) for t in texts]
    return group_corpus(spec, load, captions, out, features, k=s.group_size, backend=s.index,
                             dedup=s.dedup, job=job)  # fmt: skip


def summarize_stage(cfg: ICSDConfig, groups: list[Group], out: Path, job: Job):
    """Stage 2: the LLM's selection and summary of every group (resumable, sharded)."""
    result = summarize(cfg.synthesis.llm, groups, out, job=job)
    if result is not None:
        logger.info("icsd: %s", result)
        if result.warning():
            logger.warning("icsd: %s", result.warning())
    job.wait_for_everyone()
    return read_summaries(out / "summaries.jsonl", job.skip_log)


def image_stage(cfg: ICSDConfig, prompts: list[Caption], out: Path, job: Job) -> list[Path | None]:
    """Stages 3 and 4: one image per prompt (resumable, sharded); None where no usable image
    was made (skipped, or left out as flagged NSFW)."""
    planned, result = draw_images(cfg.synthesis.images, prompts, out, job=job)
    if result is not None:
        logger.info("icsd: %s", result)
    job.wait_for_everyone()
    usable = {}
    for item in dataset_images(out / "dataset.jsonl", skip_log=job.skip_log):
        usable[item.image_id] = item.path
    return [usable.get(p.id) for p in planned]


def readable(path: Path, job: Job) -> bool:
    """Whether an image file opens (checked once, before training reads it every epoch)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        job.skip_log.skip(BadInputError(path, f"unreadable image: {first_line(err)}"))
        return False


# --------------------------------------------------------------------------- training
@register_recipe("icsd", ICSDConfig)
def train_icsd(cfg: ICSDConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """ICSD: synthesize multi-context images of the corpus, then train an image captioner."""
    check_corpus(cfg.corpus)  # the files named; the settings were checked when cfg was made
    check_validation(cfg.validation)
    s = cfg.synthesis
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    out = Path(s.out) if s.out else Path(cfg.train.output_dir) / "synthetic"
    features = Path(cfg.features) if cfg.features else out / "features"
    clip = load_clip(cfg.clip, device=job.state.device)
    try:  # the captioner's copy of the image tower, made now: a bad size fails before synthesis
        vision = clip.vision_tower(cfg.image_size)
    except PairfreeError as err:
        raise PairfreeError(f"image_size={cfg.image_size}: {err} (image_size: null reads the "
                            "tower's own size)") from None  # fmt: skip
    texts = [
        c.text for c in prepare_corpus(cfg.corpus, job.skip_log)
    ]  # repeats too, as ICSD groups
    if len(texts) < 2:
        raise PairfreeError(f"{cfg.corpus.path}: ICSD groups captions; it needs at least 2")

    # pairs: (image, caption, group); a group is one image and the captions paired with it
    pairs: list[tuple[Path, str, str]] = []
    if s.multi_context:
        groups = group_stage(cfg, clip, texts, out / "groups", features / "captions", job)
        summaries = summarize_stage(cfg, groups, out / "summaries", job)
        prompts = [Caption(x.summary, x.id, "summaries", None) for x in summaries]
        images = image_stage(cfg, prompts, out / "images", job) if prompts else []
        for summary, image in zip(summaries, images, strict=True):
            if image is not None:
                pairs += [(image, caption, f"multi-{summary.id}") for caption in summary.captions]
    if s.single_context > 0:
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(cfg.corpus.seed))
        chosen = sorted(order[: round(s.single_context * len(texts))].tolist())
        prompts = [Caption(texts[i], str(i), cfg.corpus.path, None) for i in chosen]
        images = image_stage(cfg, prompts, out / "single", job)
        if s.reassign is None:
            pairs += [(image, texts[i], f"single-{i}")
                      for i, image in zip(chosen, images, strict=True) if image is not None]  # fmt: skip
        else:  # one group per image: SynC may give an image several captions
            folder = training_images(str(out / "single"), s.reassign, out / "single-reassigned",
                                     job=job, clip=clip, clip_spec=cfg.clip)  # fmt: skip
            reassigned = dataset_images(Path(folder) / "dataset.jsonl", skip_log=job.skip_log)
            pairs += [(it.path, it.references[0], f"single-{it.path.stem}") for it in reassigned]
    ok = {image: readable(image, job) for image in dict.fromkeys(p[0] for p in pairs)}
    pairs = [(image, pre_caption(text, cfg.max_words), g) for image, text, g in pairs if ok[image]]
    pairs = [p for p in pairs if p[1]]
    job.log_skips()
    if not pairs:
        raise PairfreeError(f"no training pairs were made from {cfg.corpus.path} (see {out})")
    if job.is_main_process:  # the run's own: runs with other mixes share the synthetic data
        Path(cfg.train.output_dir).mkdir(parents=True, exist_ok=True)
        write_jsonl(Path(cfg.train.output_dir) / "pairs.jsonl",
                    [{"image": str(i), "caption": c, "group": g} for i, c, g in pairs])  # fmt: skip

    # the captioner: its own copy of the CLIP image tower, and a cross-attending decoder
    if cfg.freeze_image_encoder:
        vision.requires_grad_(False)
    model, tokenizer = build_cross_attention(
        cfg.model,
        embed_dim=clip.embed_dim,
        grid_width=vision.grid_shape[1],
        seed=cfg.train.seed,
        vision=vision,
        fresh_head=not cfg.pretrained_head,
    )
    stop = cfg.generation.stop_token_ids(tokenizer)
    if not stop:
        raise PairfreeError("generation.stop must name the token that ends a caption")
    captions = tokenizer([" " + c for _, c, _ in pairs], add_special_tokens=False)["input_ids"]
    examples = [
        ImageExample(image, [], ids[: cfg.corpus.max_tokens - 1] + stop)
        for (image, _, _), ids in zip(pairs, captions, strict=True)
    ]
    data = ImageCaptionDataset(examples, vision.pixels, seed=cfg.train.seed,
                               min_scale=cfg.min_scale if cfg.augment else None)  # fmt: skip

    # validation: held-out groups (their images are never trained on), or a real val split
    names = list(dict.fromkeys(g for _, _, g in pairs))
    _, val_groups = split_train_val(len(names), cfg.corpus.val_fraction, cfg.train.seed)
    held_out = {names[i] for i in val_groups}
    train_idx = [i for i, p in enumerate(pairs) if p[2] not in held_out]
    val_idx = [i for i, p in enumerate(pairs) if p[2] in held_out]
    val_images, val_refs = validation_set(cfg.validation, pairs, held_out, job)
    logger.info("icsd: %d pairs over %d images (%d held out); %d validation images", len(pairs),
                len(names), len(held_out), len(val_images))  # fmt: skip
    evaluate = None
    if val_images:
        evaluate = caption_score_eval(clip, tokenizer, cfg.generation, val_images, val_refs,
                                      batch_size=cfg.validation.batch_size)  # fmt: skip
    return fit_cross_attention(
        cfg.train,
        CaptionerSetup(
            model, tokenizer, data.subset(train_idx, train=True), data.subset(val_idx, train=False)
        ),  # fmt: skip
        CheckpointCard("icsd", cfg.clip, Conditioning(), cfg.generation),
        run_config={
            "recipe": "icsd",
            **{k: v for k, v in asdict(cfg).items() if k != "train"},
            "model": asdict(model.config),
        },  # fmt: skip
        resume=resume,
        progress=progress,
        evaluate=evaluate,
        lr_by_prefix={} if cfg.image_encoder_lr is None else {"vision.": cfg.image_encoder_lr},
        label_smoothing=cfg.label_smoothing,
    )


def validation_set(
    v: ValidationConfig, pairs: list[tuple[Path, str, str]], held_out: set[str], job: Job
) -> tuple[list[Path], list[list[str]]]:
    """Images and references that pick the best checkpoint."""
    if v.dataset:
        return validation_images(v, job)
    references: dict[Path, list[str]] = {}
    for image, caption, group in pairs:
        if group in held_out:
            references.setdefault(image, []).append(caption)
    images = list(references)[: v.max_images]
    return images, [references[i] for i in images]
