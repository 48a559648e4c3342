"""Synthesis throughput on this machine: images/s per text-to-image backend, prompts/s per LLM
backend, and caption grouping time, exact chunked search vs faiss, on the same embeddings.

The text-to-image and LLM models are tiny and random (no hub here): their figures measure the
machinery, not Stable Diffusion or a real LLM. Grouping runs at real scale.

    python bench/synthesis.py                     # 20k captions to group
    python bench/synthesis.py --captions 100000   # the issue's 100k
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=20_000, help="captions to group")
    parser.add_argument("--dim", type=int, default=512, help="CLIP embedding size")
    parser.add_argument("--k", type=int, default=30)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args()


def rate(count: int, fn) -> float:
    start = time.perf_counter()
    fn()
    return count / (time.perf_counter() - start)


def tiny_sd(folder: Path) -> str:
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from pairfree.tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tokenizer = clip_tokenizer()
    tokenizer.model_max_length = 77
    StableDiffusionPipeline(
        vae=AutoencoderKL(block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
                          down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2),
        text_encoder=CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64,
                                                  num_attention_heads=4, num_hidden_layers=2,
                                                  vocab_size=len(tokenizer))),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=16,
                                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                                  cross_attention_dim=32, norm_num_groups=4, attention_head_dim=4),
        scheduler=DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(folder)  # fmt: skip
    return f"diffusers:{folder}"


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    from pairfree.synth.grouping import nearest_captions
    from pairfree.synth.llm import Sampling, load_llm
    from pairfree.synth.tasks import rephrase_prompt
    from pairfree.synth.text_to_image import DiffusionSettings, image_seed, load_text_to_image

    prompts = [f"a small red circle number {i} in the middle" for i in range(args.images)]
    seeds = [image_seed(0, p) for p in prompts]
    print(f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in ("world:default", tiny_sd(Path(tmp) / "sd")):
            backend = load_text_to_image(spec, DiffusionSettings(steps=20))
            per_s = rate(len(prompts), lambda b=backend: b.generate(prompts, seeds))
            name = "tiny SD (32x32, 20 steps)" if spec.startswith("diffusers") else spec
            print(f"text-to-image {name:<28} {per_s:8.1f} images/s")
    llm = load_llm("world:default")
    asks = [rephrase_prompt(p) for p in prompts]
    print(
        f"LLM world:default (rephrase)            {rate(len(asks), lambda: llm.generate(asks, Sampling())):8.1f} prompts/s"
    )

    x = torch.randn(args.captions, args.dim, generator=torch.Generator().manual_seed(0))
    exact_s = time.perf_counter()
    exact = nearest_captions(x, args.k)
    exact_s = time.perf_counter() - exact_s
    faiss_s = time.perf_counter()
    fast = nearest_captions(x, args.k, backend="faiss")
    faiss_s = time.perf_counter() - faiss_s
    same = sum(len(set(a) & set(b)) for a, b in zip(exact.tolist(), fast.tolist(), strict=True))
    print(f"grouping {args.captions} captions (d={args.dim}, k={args.k}): exact chunked torch "
          f"{exact_s:.1f} s, faiss IndexFlatIP {faiss_s:.1f} s ({exact_s / faiss_s:.1f}x); "
          f"{100 * same / exact.numel():.2f} % of neighbours shared (the rest: float ties)")  # fmt: skip


if __name__ == "__main__":
    main()
