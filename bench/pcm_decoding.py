"""PCM-Net captioning: decoding on a KV cache (each decoder layer's self-attention keys and
values so far, its cross-attention ones of the encoder output projected once) vs re-running
the whole caption at every step (what pairfree did before the cache).

The captioner is PCM-Net's at the paper's size (3 + 3 layers, width 512, 8 heads, FFN 2048,
10200 words, a ViT-B/32 grid of 50 tokens) with random weights (no checkpoint here); both
paths caption the same images with beam 3 and at most 20 words, and must give the same
captions (asserted). Random weights rarely say "." early, so captions run to the limit: the
same work for both paths.

    python bench/pcm_decoding.py               # the paper's size, 64 images
    python bench/pcm_decoding.py --small       # a quick run on a tiny captioner
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from pairfree.captioner.pcm import PCMCaptioner, PCMConfig


def caption_seconds(model: PCMCaptioner, inputs: tuple, *, use_cache: bool, beams: int,
                    tokens: int, repeats: int) -> tuple[float, list[list[int]]]:  # fmt: skip
    """The best of ``repeats`` timings of captioning ``inputs``, and the captions."""
    from pairfree.captioner import generation

    best, out = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            context = model.encode(*inputs)
            prefix = model.decoder.words(torch.zeros(len(inputs[0]), 1, dtype=torch.long))
            out = generation.generate(model.decoder, prefix, context=context,
                                      use_cache=use_cache, num_beams=beams,
                                      max_new_tokens=tokens, eos_token_id=0)  # fmt: skip
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--beams", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a tiny captioner, 16 images")
    args = parser.parse_args()
    torch.manual_seed(0)
    size = dict(width=64, heads=4, ffn=128, vocab_size=500) if args.small else {}
    cfg = PCMConfig(**size)
    images = 16 if args.small else args.images
    model = PCMCaptioner(cfg).eval()
    model.set_concepts(F.normalize(torch.randn(cfg.concepts, cfg.embed_dim), dim=-1))
    embeds = F.normalize(torch.randn(images, cfg.embed_dim), dim=-1)
    grid = torch.randn(images, cfg.class_tokens + cfg.grid_tokens, cfg.grid_width)
    dense = torch.randn(images, cfg.class_tokens + cfg.grid_tokens, cfg.embed_dim)
    inputs = (embeds, embeds, grid, dense)
    settings = dict(beams=args.beams, tokens=args.max_new_tokens, repeats=args.repeats)
    rerun, rerun_out = caption_seconds(model, inputs, use_cache=False, **settings)
    cached, cached_out = caption_seconds(model, inputs, use_cache=True, **settings)
    assert cached_out == rerun_out, "the cache changed the captions"
    mean = sum(map(len, cached_out)) / len(cached_out)
    print(f"PCM-Net decoding, {images} images, beam {args.beams}, {mean:.1f} tokens per caption, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    print("| path | images/s | speed-up |\n| --- | --- | --- |")
    print(f"| re-run the caption every step (before) | {images / rerun:.1f} | 1.0× |")
    print(f"| KV cache | {images / cached:.1f} | **{rerun / cached:.1f}×** |")


if __name__ == "__main__":
    main()
