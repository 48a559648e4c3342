"""Captioning images end to end with SaCap- and ICSD-shaped checkpoints: one image pass vs two.

Before architecture step 2 a cross-attention captioner read each image twice: its CLIP
embedding (``encode_images``) and then its grid (``encode_image_grid``), even where nothing
read the embedding (ICSD's captioner, whose own fine-tuned tower makes its grid from pixels).
Now :meth:`CaptionDecoder.image_inputs` runs CLIP's image tower once when both are read
(SaCap: soft prompt + hard prompts + grid) and not at all when only the captioner's own tower
is (ICSD). ``TwoPasses`` below is the earlier reading, kept here as the baseline; both
decoders caption the same images with the same model, and their captions must be equal
(asserted), so only the image passes differ.

Shapes as the originals (random weights: no hub here): CLIP ViT-B/32; SaCap: GPT-2 small with
cross-attention, a 10-token soft prompt projected onto a caption memory, hard prompts from a
phrase vocabulary, beam 5, 30 tokens; ICSD: BERT-base with cross-attention and its own
ViT-B/32 tower at 384 px, beam 3, 26 tokens. Random weights decode to the length limit, so the
decoding share is the largest it can be and the ratios are a lower bound.

    python bench/captioning.py --threads 1     # 16 images of 320x240
    python bench/captioning.py --small         # a quick run on tiny models
"""

from __future__ import annotations

import argparse
import random
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from encoding import WORDS, build_clip  # bench/encoding.py: the same random CLIP
from image_pass import best_time  # bench/image_pass.py
from PIL import Image
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from pairfree.captioner import Conditioning, GenerationConfig
from pairfree.captioner.cross_attention import CrossAttentionConfig, build_cross_attention
from pairfree.captioner.decoding import CaptionDecoder
from pairfree.clip import load_clip
from pairfree.data import Caption
from pairfree.encoding import encode_captions
from pairfree.job import Job
from pairfree.tokenizers import gpt2_tokenizer
from pairfree.world.lm import build_world_bert


class TwoPasses(CaptionDecoder):
    """The reading before one-pass images: the CLIP embeddings always, then the grid."""

    def image_inputs(
        self, images: Sequence[Image.Image], *, batch_size: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds = self.clip.encode_images(images, batch_size=batch_size)
        grid = self.grids(images, batch_size=batch_size) if self.needs_grid else None
        return embeds, grid


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--small", action="store_true", help="tiny models and few images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def sacap_decoder(clip, small: bool, tmp: Path) -> tuple[torch.nn.Module, dict]:
    """SaCap's captioner: GPT-2 with cross-attention, soft prompt projected onto a caption
    memory, hard prompts from a phrase vocabulary."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(2000)]
    job = Job(progress=False)
    encode_captions(clip, [Caption(t, None, "bench", None) for t in texts], tmp / "memory", job=job)
    encode_captions(clip, [Caption(w, None, "phrases", None) for w in WORDS], tmp / "phrases",
                    job=job)  # fmt: skip
    torch.manual_seed(0)
    size = dict(n_layer=2, n_embd=64, n_head=2) if small else {}
    tokenizer = gpt2_tokenizer()
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), **size)).save_pretrained(tmp / "gpt2")
    tokenizer.save_pretrained(tmp / "gpt2")
    width = clip.encode_image_grid([Image.new("RGB", (32, 32))]).shape[-1]
    model, tokenizer = build_cross_attention(
        CrossAttentionConfig(lm=str(tmp / "gpt2"), prefix_length=10, separator=":"),
        embed_dim=clip.embed_dim, grid_width=width, seed=0,
    )  # fmt: skip
    conditioning = Conditioning(normalize=True, project_to=str(tmp / "memory"), tau=0.01,
                                prompt_phrases=str(tmp / "phrases"), prompt_topk=3)  # fmt: skip
    generation = GenerationConfig(num_beams=5, max_new_tokens=30, stop=".", stop_at_eos=False,
                                  score_length="with_prompt")  # fmt: skip
    return model, dict(tokenizer=tokenizer, conditioning=conditioning, generation=generation)


def icsd_decoder(clip, small: bool, tmp: Path) -> tuple[torch.nn.Module, dict]:
    """ICSD's captioner: BERT with cross-attention over its own image tower at 384 px."""
    size = (
        dict(n_layer=2, hidden=64, n_head=2) if small else dict(n_layer=12, hidden=768, n_head=12)
    )
    bert = build_world_bert(tmp / "bert", max_length=64, **size)
    vision = clip.vision_tower(None if small else 384)
    model, tokenizer = build_cross_attention(
        CrossAttentionConfig(lm=str(bert), prefix_length=0, separator="[CLS] a picture of"),
        embed_dim=clip.embed_dim, grid_width=vision.grid_shape[1], seed=0, vision=vision,
    )  # fmt: skip
    generation = GenerationConfig(num_beams=3, max_new_tokens=26, stop="[SEP]",
                                  score_length="with_prompt")  # fmt: skip
    return model, dict(tokenizer=tokenizer, generation=generation)


def main() -> None:
    args = parse_args()
    hf_logging.set_verbosity_error()  # the new cross-attention layers' load report
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 4 if args.small else args.images
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)
    ]
    print(f"images: {n} of 320x240, batch: {args.batch_size}, torch threads: "
          f"{torch.get_num_threads()}, best of {args.repeats}")  # fmt: skip
    print(f"{'checkpoint':<10}{'two passes img/s':>18}{'now img/s':>12}{'speed-up':>10}"
          f"{'CLIP image passes (before -> now)':>36}")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        clip = load_clip("hf:" + build_clip(args.small, tmp + "/clip"))
        for name, build in (("SaCap", sacap_decoder), ("ICSD", icsd_decoder)):
            model, rest = build(clip, args.small, Path(tmp) / name)
            before, now = (
                TwoPasses(model, clip=clip, **rest),
                CaptionDecoder(model, clip=clip, **rest),
            )
            now.caption(images[:2])  # warm-up
            t_before, captions_before = best_time(
                lambda d=before: d.caption(images, batch_size=args.batch_size), args.repeats
            )
            t_now, captions_now = best_time(
                lambda d=now: d.caption(images, batch_size=args.batch_size), args.repeats
            )
            assert captions_now == captions_before, f"{name}: the captions differ"
            passes = "2 -> 1" if now.needs_embeddings else "1 -> 0 (its own tower reads pixels)"
            print(f"{name:<10}{n / t_before:>18.2f}{n / t_now:>12.2f}{t_before / t_now:>9.2f}x"
                  f"{passes:>36}")  # fmt: skip


if __name__ == "__main__":
    main()
