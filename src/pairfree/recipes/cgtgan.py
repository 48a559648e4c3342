"""CgT-GAN (Yu et al., 2023): a CLIP-guided text GAN trained on images and a corpus that were
never paired.

1. Initialization: the captioner learns the corpus' language by training on its captions with
   each caption's own CLIP text embedding as the condition (one epoch, lr 2e-5, weight decay
   0.05, warm-up 5000), or starts from any captioner checkpoint (``init.from_checkpoint``).
   The targets are the caption's tokens only, and captions end at "." only, in sampling and
   decoding alike (``generation.stop_at_eos: false``; ``true`` adds end-of-text to both).
2. Aggregation: each training image v gets ``a = softmax(t * cos(v, C)) @ C`` over the corpus
   text embeddings C (t = 100 for an in-domain corpus, 175 for a web corpus), cached.
3. Adversarial self-critical training (:mod:`pairfree.training.adversarial`): k = 5 sampled
   captions per image against a greedy baseline, rewarded by
   ``lambda * r_clip + (1 - lambda) * r_disc`` with the CLIP reward against a and the logit of
   a discriminator updated on corpus sentences vs samples every step; lambda 0 for 150 steps,
   then linear to 0.5 over 2350. The best checkpoint is the one with the highest validation
   CIDEr.

The corpus is written as CgT-GAN's preprocessing writes COCO's and Flickr30k's captions: a
final punctuation character ("?", "!", ",", "." ...) replaced by ".", the first character
upper-cased; CLIP reads each sentence without that "." and each generated caption without a
final "." (:func:`~pairfree.training.adversarial.corpus_sentence`). The condition is the
un-normalized CLIP embedding (text in step 1, image in step 3), and the captioner is an mlp
mapper with k = 10 prefix tokens, as in the paper.

Where pairfree differs from the original code: its web corpora (GCC, Shutterstock) go through
scripts of their own (punctuation words dropped at both ends, the caption cut at its first
sentence break, captions of 6 words or fewer dropped and those over 15 subsampled or dropped); pairfree writes every corpus as the
COCO script does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import partial

from pairfree.captioner import CheckpointCard
from pairfree.clip import load_clip
from pairfree.job import Job
from pairfree.recipes import register_recipe
from pairfree.training.adversarial import (
    InitConfig,
    UnpairedConfig,
    encode_unpaired_corpus,
    init_output_dir,
    train_gan,
)
from pairfree.training.fitting import fit_captioner
from pairfree.training.text_only import caption_step, caption_val_step, text_only_setup
from pairfree.training.trainer import TrainResult


@dataclass
class CgtGanConfig(UnpairedConfig):
    """The unpaired settings (CgT-GAN's paper defaults) and the text-only initialization."""

    init: InitConfig = field(default_factory=InitConfig)


def initialize_on_text(cfg: CgtGanConfig, *, resume: bool, progress: bool) -> TrainResult:
    """Step 1: caption cross-entropy given each caption's own (un-noised) CLIP text embedding."""
    job = Job.create(cpu=cfg.init.train.cpu, progress=progress)
    clip = load_clip(cfg.clip, device=job.state.device)
    store = encode_unpaired_corpus(cfg, clip, job)
    job.log_skips()
    seed = cfg.init.train.seed
    setup = text_only_setup(store.texts, store.tensor(), cfg.model, cfg.corpus, seed=seed,
                            generation=cfg.generation)  # fmt: skip
    return fit_captioner(
        replace(cfg.init.train, output_dir=str(init_output_dir(cfg, cfg.init))),
        setup,
        caption_step(cfg.conditioning),
        caption_val_step(cfg.conditioning, seed=seed),
        CheckpointCard("cgtgan-init", cfg.clip, cfg.conditioning, cfg.generation),
        run_config={"recipe": "cgtgan-init", "config": asdict(cfg)},
        resume=resume,
        progress=progress,
    )


@register_recipe("cgtgan", CgtGanConfig)
def train_cgtgan(cfg: CgtGanConfig, *, resume: bool = True, progress: bool = True) -> TrainResult:
    """CgT-GAN: initialize on the corpus text, then adversarial SCST on unpaired images."""
    initialize = partial(initialize_on_text, cfg, resume=resume, progress=progress)
    return train_gan(cfg, cfg.init, initialize, recipe="cgtgan", resume=resume, progress=progress)
