"""The adversarial self-critical phase both GAN recipes (CgT-GAN, SCST-GAN) end with.

Per batch of unpaired training images (CLIP embedding v, aggregated textual embedding a):

1. sample k captions per image (and a greedy one as the baseline) from the generator;
2. reward each caption with the CLIP reward against a (optionally blended with v; CLIP reads
   the caption without its final ".", as the corpus was encoded) and with the logit of the
   discriminator as it is before this step's update;
3. update the discriminator once on corpus sentences (real) vs the samples (fake), BCE;
4. update the generator with ``lambda * L_clip + (1 - lambda) * L_disc``, each
   ``-mean((r - b) * logp)`` with length-normalized log-probabilities, lambda following
   :func:`~pairfree.training.rewards.reward_mix`.

The best checkpoint is the one with the highest validation CIDEr. The generator reads image
embeddings as it will at inference (``condition(..., training=False)``).

One deliberate difference from CgT-GAN's code: it samples the k captions with the generator
in train mode (dropout on) and differentiates the log-probabilities of that sampling pass.
Here the captions are sampled without dropout by the KV-cached, gradient-free decoder - the
same network that gives the greedy baseline and that captions at inference, so sample and
baseline are scored under one policy - and their log-probabilities come from one teacher-
forced pass through the (DDP-wrapped) generator in train mode, so that gradients are
synchronized across processes. Differentiating through a multi-process incremental decode is
what that would take otherwise.

:class:`UnpairedConfig` holds the settings of the unpaired setting that both recipes share; its
defaults are CgT-GAN's paper settings, which a recipe's config overrides where its method
differs. :class:`InitConfig` is the text-conditioned initialization each recipe runs first.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from pairfree.captioner import (
    CaptionerConfig,
    CheckpointCard,
    Conditioning,
    GenerationConfig,
    caption_log_probs,
    condition,
    load_captioner,
)
from pairfree.captioner.decoding import CaptionDecoder
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import dataset_images, image_sources, is_dataset_file
from pairfree.data.training_corpus import CorpusConfig, check_corpus
from pairfree.encoding import encode_corpus, encode_images
from pairfree.errors import PairfreeError
from pairfree.evaluate import caption_metrics
from pairfree.features import FeatureStore
from pairfree.job import Job
from pairfree.training.fitting import pad_collate, save_with_card
from pairfree.training.rewards import (
    BASELINES,
    TextDiscriminator,
    clip_reward,
    discriminator_loss,
    leave_one_out_baseline,
    reward_mix,
    self_critical_loss,
    without_final_period,
    write_aggregated_store,
)
from pairfree.training.trainer import (
    OptimizerSpec,
    TrainConfig,
    Trainer,
    TrainResult,
    captions_across_processes,
)


# --------------------------------------------------------------------------- config
@dataclass
class ImagesConfig:
    """The unpaired training images: a dataset file (the images of ``split``; any captions in it
    are ignored) or an image folder / glob."""

    path: str = ""
    split: str = "train"
    image_root: str | None = None
    allow_outside_root: bool = False  # read file names leading out of image_root (links)


@dataclass
class ValConfig:
    """Images with references for the validation CIDEr that picks the best checkpoint."""

    dataset: str = ""  # Karpathy/COCO/NoCaps JSON; "" trains without validation
    split: str = "val"
    image_root: str | None = None
    allow_outside_root: bool = False  # read file names leading out of image_root (links)
    batch_size: int = 64


@dataclass
class AdversarialConfig:
    samples: int = 5  # sampled captions per image
    baseline: str = "greedy"  # greedy | leave-one-out
    sample_temperature: float = 1.0
    temperature: float = 100.0  # t of the aggregation: 100 in-domain corpus, 175 web corpus
    scale: float = 100.0  # s, CLIP's logit scale
    cos_weight: float = 0.5  # cosine vs L1 similarity to the aggregated embedding
    clip_weight: float = 0.0  # blend in s * cos(v, e), the image-text similarity
    reward_weight: float = 0.5  # final lambda of the CLIP reward (the rest is the discriminator's)
    hold_steps: int = 150  # lambda = 0 for this many steps ...
    ramp_steps: int = 2350  # ... then rises linearly to reward_weight over these
    discriminator: str = "roberta-base"  # any Hugging Face encoder
    discriminator_lr: float | None = None  # None: train.lr
    aggregate_chunk: int = 65536  # corpus rows per block of the aggregation
    aggregate_batch: int = 1024  # images per aggregation pass over the corpus


def adversarial_train_config(warmup_steps: int) -> TrainConfig:
    """The adversarial phase's loop: AdamW lr 1e-5, wd 0.05, constant after ``warmup_steps``,
    grad clip 1.0, batch 128 (CgT-GAN: 64 per GPU on 2 GPUs), best checkpoint by validation
    CIDEr."""
    return TrainConfig(
        epochs=50,
        batch_size=128,
        lr=1e-5,
        weight_decay=0.05,
        warmup_steps=warmup_steps,
        schedule="constant",
        grad_clip=1.0,
        select_metric="CIDEr",
        select_mode="max",
    )


@dataclass
class InitConfig:
    from_checkpoint: str | None = None  # a captioner checkpoint to start from (skips training)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            output_dir="",  # "": <train.output_dir>/init
            epochs=1,
            lr=2e-5,
            weight_decay=0.05,
            warmup_steps=5000,
            schedule="constant",
            batch_size=16,  # CgT-GAN's initialization.py runs on one GPU
        )
    )


@dataclass
class UnpairedConfig:
    clip: str = "hf:openai/clip-vit-large-patch14"
    features: str | None = None  # cache of every encoded set; default <output_dir>/features
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    val: ValConfig = field(default_factory=ValConfig)
    normalize: bool = False  # condition on normalized CLIP embeddings (the paper does not)
    model: CaptionerConfig = field(
        default_factory=lambda: CaptionerConfig(mapper="mlp", prefix_length=10)
    )
    gan: AdversarialConfig = field(default_factory=AdversarialConfig)
    train: TrainConfig = field(default_factory=lambda: adversarial_train_config(warmup_steps=150))
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(
            num_beams=1, max_new_tokens=20, stop=".", stop_at_eos=False
        )
    )

    @property
    def features_root(self) -> Path:
        return Path(self.features) if self.features else Path(self.train.output_dir) / "features"

    @property
    def conditioning(self) -> Conditioning:
        """The un-normalized CLIP embedding (text in the initialization, image after)."""
        return Conditioning(normalize=self.normalize)

    def check_inputs(self) -> None:
        """Fail in a second on data that is not there, before any model is loaded."""
        check_corpus(self.corpus)
        if not self.images.path:
            raise PairfreeError("images.path is not set: give the unpaired training images")
        if is_dataset_file(self.images.path) and not Path(self.images.path).is_file():
            raise PairfreeError(f"images.path: {self.images.path} does not exist")
        if self.val.dataset and not Path(self.val.dataset).is_file():
            raise PairfreeError(f"val.dataset: {self.val.dataset} does not exist")


def init_output_dir(cfg: UnpairedConfig, init: InitConfig) -> Path:
    return Path(init.train.output_dir or Path(cfg.train.output_dir) / "init")


def train_gan(
    cfg: UnpairedConfig,
    init: InitConfig,
    initialize: Callable[[], object],
    *,
    recipe: str,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Start from ``init.from_checkpoint``, else from ``<init dir>/last`` (trained by
    ``initialize`` unless an earlier run finished it), and train adversarially from there."""
    cfg.check_inputs()
    if init.from_checkpoint:
        start = Path(init.from_checkpoint)
    else:
        start = init_output_dir(cfg, init) / "last"
        if not (resume and start.exists()):
            initialize()
    return train_adversarial(cfg, start, recipe=recipe, resume=resume, progress=progress)


# --------------------------------------------------------------------------- data
@dataclass
class UnpairedData:
    corpus: FeatureStore  # CLIP text embeddings of the corpus sentences (with their texts)
    images: FeatureStore  # CLIP image embeddings of the unpaired training images


def corpus_sentence(caption: str) -> str:
    """A corpus caption as CgT-GAN's preprocessing writes it (``preprocess/coco/
    coco_train_captions.py``, and Flickr30k's alike): a final punctuation character (any of
    ``string.punctuation``: "?", "!", ",", "." ...) is dropped, "." is added, and the first
    character is upper-cased. The result is the initialization's target and a real sentence
    for the discriminator; CLIP reads it without that "." (:func:`without_final_period`)."""
    if caption and caption[-1] in string.punctuation:
        caption = caption[:-1]
    caption += "."
    return caption[0].upper() + caption[1:]


def encode_unpaired_corpus(cfg: UnpairedConfig, clip: ClipEncoder, job: Job) -> FeatureStore:
    """The corpus as CgT-GAN encodes it (each sentence as :func:`corpus_sentence` writes it,
    CLIP reading it without its final period), shared by the initialization, the aggregation
    and the discriminator's real sentences."""
    return encode_corpus(clip, cfg.corpus, cfg.features_root / "corpus", job,
                         edit=corpus_sentence, clip_text=without_final_period)  # fmt: skip


def prepare_unpaired(cfg: UnpairedConfig, clip: ClipEncoder, job: Job) -> UnpairedData:
    """Encode (or reuse) the corpus and the image pool, sharded over the processes."""
    root = cfg.features_root
    corpus = encode_unpaired_corpus(cfg, clip, job)
    if not cfg.images.path:
        raise PairfreeError("images.path is not set: give the unpaired training images")
    pairs = image_sources(
        cfg.images.path,
        split=cfg.images.split,
        image_root=cfg.images.image_root,
        allow_outside_root=cfg.images.allow_outside_root,
        skip_log=job.skip_log,
    )
    encode_images(clip, pairs, root / "images", job=job)
    job.wait_for_everyone()  # the main process marks the store complete after the others return
    data = UnpairedData(corpus, FeatureStore(root / "images"))
    if not len(data.corpus) or not len(data.images):
        raise PairfreeError(
            f"nothing to train on: {len(data.corpus)} corpus sentences, {len(data.images)} images"
        )
    return data


class ImageRewardDataset(Dataset):
    """(CLIP image embedding v, aggregated text embedding a) per unpaired training image."""

    def __init__(self, images: torch.Tensor, aggregated: torch.Tensor) -> None:
        if images.shape != aggregated.shape:
            raise PairfreeError(
                f"{tuple(images.shape)} image embeddings but {tuple(aggregated.shape)} aggregated"
            )
        self.images, self.aggregated = images, aggregated

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.aggregated[i]


def validation_set(
    cfg: UnpairedConfig, clip: ClipEncoder, job: Job
) -> tuple[list[str], torch.Tensor | None, dict[str, list[str]]]:
    """(ids, CLIP image embeddings, references) of the captioned validation images."""
    if not cfg.val.dataset:
        return [], None, {}
    items = dataset_images(
        cfg.val.dataset,
        split=cfg.val.split,
        image_root=cfg.val.image_root,
        allow_outside_root=cfg.val.allow_outside_root,
        skip_log=job.skip_log,
    )
    pairs = [(it.image_id, it.path) for it in items if it.references]
    out = cfg.features_root / f"val-{cfg.val.split}"
    encode_images(clip, pairs, out, job=job)
    job.wait_for_everyone()
    store = FeatureStore(out)
    return store.ids, store.tensor(), {it.image_id: list(it.references) for it in items}


def stop_token_ids(tokenizer, generation: GenerationConfig) -> list[int]:
    """Where sampled captions end: the stop text's last token, and end-of-text with
    ``generation.stop_at_eos`` (CgT-GAN's sampling ends at "." only), kept so the policy
    gradient also scores the decision to stop."""
    eos = [tokenizer.eos_token_id] if generation.stop_at_eos else []
    return [*eos, *generation.stop_token_ids(tokenizer)]


# --------------------------------------------------------------------------- training
def train_adversarial(
    cfg: UnpairedConfig,
    init_checkpoint: str | Path,
    *,
    recipe: str,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Adversarial self-critical training of the captioner at ``init_checkpoint``."""
    g = cfg.gan
    if g.baseline not in BASELINES:
        raise PairfreeError(f"gan.baseline must be one of {BASELINES}, not {g.baseline!r}")
    if g.samples < (2 if g.baseline == "leave-one-out" else 1):
        raise PairfreeError(f"gan.samples={g.samples} is too few for a {g.baseline} baseline")
    job = Job.create(cpu=cfg.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    data = prepare_unpaired(cfg, clip, job)
    aggregated_dir = cfg.features_root / f"aggregated-t{g.temperature:g}"
    write_aggregated_store(
        aggregated_dir,
        data.images,
        data.corpus,
        g.temperature,
        chunk=g.aggregate_chunk,
        batch_size=g.aggregate_batch,
        device=job.state.device,
        job=job,
    )
    job.wait_for_everyone()
    train_data = ImageRewardDataset(data.images.tensor(), FeatureStore(aggregated_dir).tensor())
    corpus_texts = data.corpus.texts
    val_ids, val_embeds, references = validation_set(cfg, clip, job)
    job.log_skips()

    model, tokenizer, _ = load_captioner(init_checkpoint)
    if model.config.embed_dim != data.images.dim:
        raise PairfreeError(
            f"{init_checkpoint} takes {model.config.embed_dim}-d conditions, but {cfg.clip} "
            f"embeds images in {data.images.dim} dimensions"
        )
    torch.manual_seed(cfg.train.seed)  # the discriminator head's initialization
    discriminator = TextDiscriminator.from_pretrained(
        g.discriminator, max_length=cfg.generation.max_new_tokens + 2
    )
    conditioning = cfg.conditioning
    stops = stop_token_ids(tokenizer, cfg.generation)
    collate = pad_collate(tokenizer.pad_token_id)

    def decode(sequences: list[list[int]]) -> list[str]:
        return [tokenizer.decode(s, skip_special_tokens=True).strip() for s in sequences]

    def step(ctx, batch):
        images, agg = batch
        cond = condition(images, conditioning, training=False)
        n, k = len(cond), g.samples
        generator = ctx.unwrap("generator")
        disc = ctx.unwrap("discriminator")

        generator.eval()  # decode without dropout; the gradient pass below runs in train mode
        samples = generator.generate(
            cond,
            do_sample=True,
            num_return_sequences=k,
            temperature=g.sample_temperature,
            max_new_tokens=cfg.generation.max_new_tokens,
            stop_token_ids=stops,
        )
        greedy = []
        if g.baseline == "greedy":
            greedy = generator.generate(
                cond, max_new_tokens=cfg.generation.max_new_tokens, stop_token_ids=stops
            )
        generator.train()
        sample_texts, greedy_texts = decode(samples), decode(greedy)

        # the discriminator's loss on as many corpus sentences (real) as samples (fake)
        real = [corpus_texts[i] for i in torch.randint(len(corpus_texts), (n * k,)).tolist()]
        logits = ctx.modules["discriminator"](*disc.tokenize(real + sample_texts, ctx.device))
        d_loss = discriminator_loss(logits[: n * k], logits[n * k :])

        # rewards of the samples and the greedy captions, from the discriminator as it was
        # before this step's update (as CgT-GAN's code does) and from CLIP
        texts = sample_texts + greedy_texts
        rows = torch.arange(n, device=cond.device).repeat_interleave(k)
        if greedy:
            rows = torch.cat((rows, torch.arange(n, device=cond.device)))
        with torch.no_grad():
            disc.eval()
            r_disc = disc(*disc.tokenize(texts, ctx.device)).float()
            disc.train()
            clip_texts = [without_final_period(t) for t in texts]
            e = clip.encode_texts(clip_texts, batch_size=len(texts)).to(ctx.device)
            r_clip = clip_reward(
                e,
                agg[rows],
                images[rows],
                scale=g.scale,
                cos_weight=g.cos_weight,
                clip_weight=g.clip_weight,
            )
        ctx.optimize("discriminator", d_loss)

        def with_baseline(r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            sampled = r[: n * k].view(n, k)
            if greedy:
                return sampled, r[n * k :].view(n, 1).expand(n, k)
            return sampled, leave_one_out_baseline(sampled)

        cond_k = cond.repeat_interleave(k, dim=0)
        _, ids, mask = collate(list(zip(cond_k, samples, strict=True)))
        ids, mask = ids.to(ctx.device), mask.to(ctx.device)
        out = ctx.modules["generator"](cond_k, ids, mask)
        log_probs = caption_log_probs(out.logits, ids, mask)
        lam = reward_mix(
            ctx.global_step,
            weight=g.reward_weight,
            hold_steps=g.hold_steps,
            ramp_steps=g.ramp_steps,
        )
        clip_loss = self_critical_loss(log_probs, *with_baseline(r_clip))
        disc_loss = self_critical_loss(log_probs, *with_baseline(r_disc))
        loss = lam * clip_loss + (1 - lam) * disc_loss
        ctx.optimize("generator", loss)
        fake_acc = (logits[n * k :] < 0).float().mean()
        real_acc = (logits[: n * k] > 0).float().mean()
        return {
            "g_loss": loss.detach(),
            "d_loss": d_loss.detach(),
            "d_acc": (fake_acc + real_acc) / 2,
            "r_clip": r_clip[: n * k].mean(),
            "r_disc": r_disc[: n * k].mean(),
            "lambda": lam,
        }

    def evaluate(ctx) -> dict[str, float]:
        """Greedy captions of the validation images (sharded over processes), CIDEr x100."""
        generator = ctx.unwrap("generator")
        captioner = CaptionDecoder(
            generator, tokenizer, clip, conditioning=conditioning, generation=cfg.generation
        )
        predictions = captions_across_processes(
            ctx.accelerator,
            val_ids,
            lambda mine: captioner.caption_embeddings(
                val_embeds[mine], batch_size=cfg.val.batch_size
            ),
        )
        generator.train()
        return {"CIDEr": caption_metrics(predictions, references, metrics=("CIDEr",))["CIDEr"]}

    card = CheckpointCard(recipe, cfg.clip, conditioning, cfg.generation)
    trainer = Trainer(
        cfg.train,
        {"generator": model, "discriminator": discriminator},
        [
            OptimizerSpec("generator"),
            OptimizerSpec("discriminator", lr=g.discriminator_lr, warmup_steps=0),
        ],
        train_data,
        step,
        save_with_card(card, tokenizer, module="generator"),
        evaluate=evaluate if val_ids else None,
        run_config={"recipe": recipe, "config": asdict(cfg), "init": str(init_checkpoint)},
        progress=progress,
    )
    return trainer.fit(resume=resume)
