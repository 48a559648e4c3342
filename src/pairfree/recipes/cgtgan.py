"""CgT-GAN (Yu et al., 2023): a CLIP-guided text GAN trained on images and a corpus that were
never paired.

1. Initialization: the captioner learns the corpus' language by training on its captions with
   each caption's own CLIP text embedding as the condition (one epoch, lr 2e-5, weight decay
   0.05, warm-up 5000) - a CapDec run without noise, so it runs as one - or starts from any
   captioner checkpoint (``init.from_checkpoint``).
2. Aggregation: each training image v gets ``a = softmax(t * cos(v, C)) @ C`` over the corpus
   text embeddings C (t = 100 for an in-domain corpus, 175 for a web corpus), cached.
3. Adversarial self-critical training, per batch of images: sample k = 5 captions per image
   (plus a greedy one as the baseline); update the discriminator once on corpus sentences
   (real) vs the samples (fake); reward each caption with the CLIP reward against a (and
   optionally v) and with the discriminator's logit; update the captioner with
   ``lambda * L_clip + (1 - lambda) * L_disc``, each ``-mean((r - b) * logp)`` with
   length-normalized log-probabilities, lambda 0 for 150 steps then linear to 0.5 over 2350.
   The best checkpoint is the one with the highest validation CIDEr.

The condition is the un-normalized CLIP embedding (text in step 1, image in step 3), and the
captioner is an mlp mapper with k = 10 prefix tokens, as in the paper. Step 3 is
:func:`train_adversarial`, which SCST-GAN runs after its own initialization.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import gather_object
from torch.utils.data import Dataset

from pairfree.captioner import CaptionerConfig, caption_log_probs, load_captioner, save_captioner
from pairfree.clip import ClipEncoder, load_clip
from pairfree.data import collect_image_paths, image_id_for, read_images
from pairfree.encoding import encode_captions, encode_images
from pairfree.errors import PairfreeError, SkipLog
from pairfree.evaluate import caption_metrics
from pairfree.features import FeatureStore
from pairfree.pipeline import Captioner, GenerationConfig
from pairfree.recipes.capdec import (
    CapDecConfig,
    CorpusConfig,
    NoiseConfig,
    prepare_corpus,
    train_capdec,
)
from pairfree.recipes.rewards import (
    BASELINES,
    TextDiscriminator,
    clip_reward,
    discriminator_loss,
    leave_one_out_baseline,
    reward_mix,
    self_critical_loss,
    write_aggregated_store,
)
from pairfree.recipes.text_data import pad_collate
from pairfree.recipes.trainer import OptimizerSpec, TrainConfig, Trainer, TrainResult


# --------------------------------------------------------------------------- config
@dataclass
class ImagesConfig:
    """The unpaired training images: a dataset file (the images of ``split``; any captions in it
    are ignored) or an image folder / glob."""

    path: str = ""
    split: str = "train"
    image_root: str | None = None


@dataclass
class ValConfig:
    """Images with references for the validation CIDEr that picks the best checkpoint."""

    dataset: str = ""  # Karpathy/COCO/NoCaps JSON; "" trains without validation
    split: str = "val"
    image_root: str | None = None
    batch_size: int = 64


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
            batch_size=40,
        )
    )


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


@dataclass
class CgtGanConfig:
    clip: str = "hf:openai/clip-vit-large-patch14"
    features: str | None = None  # cache of every encoded set; default <output_dir>/features
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    val: ValConfig = field(default_factory=ValConfig)
    normalize: bool = False  # condition on normalized CLIP embeddings (the paper does not)
    model: CaptionerConfig = field(
        default_factory=lambda: CaptionerConfig(mapper="mlp", prefix_length=10)
    )
    init: InitConfig = field(default_factory=InitConfig)
    gan: AdversarialConfig = field(default_factory=AdversarialConfig)
    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
            epochs=50,
            batch_size=128,
            lr=1e-5,
            weight_decay=0.05,
            warmup_steps=150,
            schedule="constant",
            grad_clip=1.0,
            select_metric="CIDEr",
            select_mode="max",
        )
    )
    generation: GenerationConfig = field(
        default_factory=lambda: GenerationConfig(num_beams=1, max_new_tokens=20, stop=".")
    )


# --------------------------------------------------------------------------- data
@dataclass
class UnpairedData:
    corpus: FeatureStore  # CLIP text embeddings of the corpus sentences (with their texts)
    images: FeatureStore  # CLIP image embeddings of the unpaired training images


def features_root(cfg: CgtGanConfig) -> Path:
    return Path(cfg.features) if cfg.features else Path(cfg.train.output_dir) / "features"


def init_output_dir(cfg: CgtGanConfig) -> Path:
    return Path(cfg.init.train.output_dir or Path(cfg.train.output_dir) / "init")


def text_init_config(cfg: CgtGanConfig) -> CapDecConfig:
    """The initialization as a CapDec run: no noise, so the condition is the caption's own
    CLIP text embedding (un-normalized unless ``normalize``)."""
    return CapDecConfig(
        clip=cfg.clip,
        features=str(features_root(cfg) / "corpus"),
        corpus=cfg.corpus,
        model=cfg.model,
        noise=NoiseConfig(variance=0.0, normalize=cfg.normalize),
        train=replace(cfg.init.train, output_dir=str(init_output_dir(cfg))),
        generation=cfg.generation,
    )


def image_list(path: str, *, split: str, image_root: str | None, skip_log: SkipLog):
    """``(image_id, path)`` pairs of a dataset file's split, or of image files/folders/globs."""
    if not path:
        raise PairfreeError("images.path is not set: give the unpaired training images")
    source = Path(path)
    if source.is_file() and source.suffix.lower() in (".json", ".jsonl", ".ndjson"):
        items = read_images(source, split=split, image_root=image_root, skip_log=skip_log)
        return [(it.image_id, it.path) for it in items if it.path is not None]
    return [(image_id_for(p), p) for p in collect_image_paths([path], skip_log=skip_log)]


def prepare_unpaired(
    cfg: CgtGanConfig, clip: ClipEncoder, skip_log: SkipLog, *, progress: bool
) -> UnpairedData:
    """Encode (or reuse) the corpus and the image pool, sharded over the processes."""
    state = PartialState()
    shard = {
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "barrier": state.wait_for_everyone,
        "skip_log": skip_log,
        "progress": progress,
    }
    root = features_root(cfg)
    captions = prepare_corpus(text_init_config(cfg), skip_log)
    encode_captions(clip, captions, root / "corpus", **shard)
    pairs = image_list(
        cfg.images.path, split=cfg.images.split, image_root=cfg.images.image_root, skip_log=skip_log
    )
    encode_images(clip, pairs, root / "images", **shard)
    state.wait_for_everyone()  # rank 0 marks the stores complete after the others return
    data = UnpairedData(FeatureStore(root / "corpus"), FeatureStore(root / "images"))
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


def condition(x: torch.Tensor, normalize: bool) -> torch.Tensor:
    return F.normalize(x, dim=-1) if normalize else x


def stop_token_ids(tokenizer, generation: GenerationConfig) -> list[int]:
    """Where sampled captions end: the stop text's last token and end-of-text, both kept so
    the policy gradient also scores the decision to stop."""
    return [tokenizer.eos_token_id, *generation.stop_token_ids(tokenizer)]


# --------------------------------------------------------------------------- training
def train_adversarial(
    cfg: CgtGanConfig,
    init_checkpoint: str | Path,
    *,
    recipe: str,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Adversarial self-critical training of the captioner at ``init_checkpoint`` (step 3)."""
    g = cfg.gan
    if g.baseline not in BASELINES:
        raise PairfreeError(f"gan.baseline must be one of {BASELINES}, not {g.baseline!r}")
    if g.samples < (2 if g.baseline == "leave-one-out" else 1):
        raise PairfreeError(f"gan.samples={g.samples} is too few for a {g.baseline} baseline")
    state = PartialState(cpu=cfg.train.cpu)
    skip_log = SkipLog()
    clip = load_clip(cfg.clip, device=state.device)
    data = prepare_unpaired(cfg, clip, skip_log, progress=progress)
    root = features_root(cfg)
    write_aggregated_store(
        root / f"aggregated-t{g.temperature:g}",
        data.images,
        data.corpus,
        g.temperature,
        chunk=g.aggregate_chunk,
        batch_size=g.aggregate_batch,
        device=state.device,
        process_index=state.process_index,
        num_processes=state.num_processes,
        barrier=state.wait_for_everyone,
        progress=progress,
    )
    state.wait_for_everyone()
    aggregated = FeatureStore(root / f"aggregated-t{g.temperature:g}")
    train_data = ImageRewardDataset(data.images.tensor(), aggregated.tensor())
    corpus_texts = data.corpus.texts

    val_ids, val_embeds, references = [], None, {}
    if cfg.val.dataset:
        items = read_images(
            cfg.val.dataset, split=cfg.val.split, image_root=cfg.val.image_root, skip_log=skip_log
        )
        pairs = [(it.image_id, it.path) for it in items if it.path is not None and it.references]
        encode_images(
            clip,
            pairs,
            root / f"val-{cfg.val.split}",
            skip_log=skip_log,
            process_index=state.process_index,
            num_processes=state.num_processes,
            barrier=state.wait_for_everyone,
            progress=progress,
        )
        state.wait_for_everyone()
        val_store = FeatureStore(root / f"val-{cfg.val.split}")
        val_ids, val_embeds = val_store.ids, val_store.tensor()
        references = {it.image_id: list(it.references) for it in items}
    if skip_log:
        print(skip_log.summary())

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
    stops = stop_token_ids(tokenizer, cfg.generation)
    collate = pad_collate(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)

    def decode(sequences: list[list[int]]) -> list[str]:
        return [tokenizer.decode(s, skip_special_tokens=True).strip() for s in sequences]

    def step(ctx, batch):
        images, agg = batch
        cond = condition(images, cfg.normalize)
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

        # the discriminator first: as many corpus sentences (real) as samples (fake)
        real = [corpus_texts[i] for i in torch.randint(len(corpus_texts), (n * k,)).tolist()]
        logits = ctx.modules["discriminator"](*disc.tokenize(real + sample_texts, ctx.device))
        d_loss = discriminator_loss(logits[: n * k], logits[n * k :])
        ctx.optimize("discriminator", d_loss)

        # rewards of the samples and the greedy captions, from the updated discriminator
        texts = sample_texts + greedy_texts
        rows = torch.arange(n, device=cond.device).repeat_interleave(k)
        if greedy:
            rows = torch.cat((rows, torch.arange(n, device=cond.device)))
        with torch.no_grad():
            disc.eval()
            r_disc = disc(*disc.tokenize(texts, ctx.device)).float()
            disc.train()
            e = clip.encode_texts(texts, batch_size=len(texts)).to(ctx.device)
            r_clip = clip_reward(
                e,
                agg[rows],
                images[rows],
                scale=g.scale,
                cos_weight=g.cos_weight,
                clip_weight=g.clip_weight,
            )

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
        acc = ctx.accelerator
        generator = ctx.unwrap("generator")
        mine = slice(acc.process_index, None, acc.num_processes)
        captioner = Captioner(
            generator, tokenizer, clip, normalize=cfg.normalize, generation=cfg.generation
        )
        texts = captioner.caption_embeddings(val_embeds[mine], batch_size=cfg.val.batch_size)
        generator.train()
        predictions = dict(gather_object(list(zip(val_ids[mine], texts, strict=True))))
        return {"CIDEr": caption_metrics(predictions, references, metrics=("CIDEr",))["CIDEr"]}

    def save(modules, path: Path) -> None:
        save_captioner(
            modules["generator"],
            tokenizer,
            path,
            extra={
                "recipe": recipe,
                "clip": cfg.clip,
                "condition": {"normalize": cfg.normalize, "offset": None},
                "generation": asdict(cfg.generation),
            },
        )

    trainer = Trainer(
        cfg.train,
        {"generator": model, "discriminator": discriminator},
        [
            OptimizerSpec("generator", "generator"),
            OptimizerSpec("discriminator", "discriminator", lr=g.discriminator_lr, warmup_steps=0),
        ],
        train_data,
        step,
        save,
        evaluate=evaluate if val_ids else None,
        run_config={"recipe": recipe, "config": asdict(cfg), "init": str(init_checkpoint)},
        progress=progress,
    )
    return trainer.fit(resume=resume)


def train_gan(
    cfg: CgtGanConfig,
    initialize: Callable[[], object],
    *,
    recipe: str,
    resume: bool = True,
    progress: bool = True,
) -> TrainResult:
    """Run ``initialize`` (writing ``<init dir>/last``) unless ``init.from_checkpoint`` names a
    captioner or an earlier run finished it, then train adversarially from there."""
    if cfg.init.from_checkpoint:
        init = Path(cfg.init.from_checkpoint)
    else:
        init = init_output_dir(cfg) / "last"
        if not (resume and init.exists()):
            initialize()
    return train_adversarial(cfg, init, recipe=recipe, resume=resume, progress=progress)


def train_cgtgan(cfg: CgtGanConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """Initialize on the corpus text (or load ``init.from_checkpoint``), then train adversarially."""
    initialize = partial(train_capdec, text_init_config(cfg), resume=resume, progress=progress)
    return train_gan(cfg, initialize, recipe="cgtgan", resume=resume, progress=progress)
