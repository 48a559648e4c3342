"""Reading images for a grid captioner: one image-tower pass vs two.

A captioner with soft or hard prompts and a cross-attending decoder (SaCap) reads each image's
CLIP embedding and its grid features. Both come from the same tower, so
``encode_images_and_grid`` runs it once; calling ``encode_images`` and ``encode_image_grid``
runs it twice. Both paths run the same HF CLIPModel (ViT-B/32 shapes, random weights: no hub
here) on the same images; their outputs must agree (asserted), so only the passes differ.

    python bench/image_pass.py            # ViT-B/32, 64 images of 224 px
    python bench/image_pass.py --small    # a quick run on a tiny CLIP
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from encoding import build_clip  # bench/encoding.py: the same random CLIP
from PIL import Image

from pairfree.clip import load_clip


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument("--small", action="store_true", help="tiny CLIP and few images")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def best_time(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 16 if args.small else args.images
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)) for _ in range(n)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        clip = load_clip("hf:" + build_clip(args.small, tmp))
        clip.encode_images_and_grid(images[:2])  # warm-up
        t_two, (embeds, grid) = best_time(
            lambda: (
                clip.encode_images(images, batch_size=args.batch_size),
                clip.encode_image_grid(images, batch_size=args.batch_size),
            ),
            args.repeats,
        )
        t_one, (embeds_one, grid_one) = best_time(
            lambda: clip.encode_images_and_grid(images, batch_size=args.batch_size), args.repeats
        )
    torch.testing.assert_close(embeds_one, embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grid_one, grid, atol=1e-4, rtol=1e-4)
    model = "tiny" if args.small else "ViT-B/32 image tower"
    print(f"images: {n}, batch: {args.batch_size}, torch threads: {torch.get_num_threads()}, "
          f"model: {model}, best of {args.repeats}")  # fmt: skip
    print(f"{'path':<44}{'seconds':>10}{'images/s':>12}")
    print(f"{'encode_images + encode_image_grid (two)':<44}{t_two:>10.2f}{n / t_two:>12.1f}")
    print(f"{'encode_images_and_grid (one)':<44}{t_one:>10.2f}{n / t_one:>12.1f}")
    print(f"speed-up (one pass / two): {t_two / t_one:.2f}x")


if __name__ == "__main__":
    main()
