"""Caption encoding throughput: batched (pairfree encode) vs one caption at a time.

The seed repos (ClipCap's and CapDec's ``parse_coco.py``) call CLIP's text tower once per
caption. pairfree batches them. Both paths run the same HF CLIPModel (ViT-B/32 shapes, random
weights: no hub here) through the same backend, on the same captions; the embeddings must
agree (asserted), so only batching differs.

    python bench/encoding.py            # ViT-B/32 text tower, 512 captions
    python bench/encoding.py --small    # a quick run on a tiny CLIP
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from pairfree.clip import load_clip
from pairfree.tokenizers import clip_tokenizer

WORDS = [
    "a",
    "man",
    "woman",
    "dog",
    "cat",
    "red",
    "blue",
    "sitting",
    "on",
    "the",
    "bench",
    "table",
    "near",
    "with",
    "riding",
    "horse",
    "street",
]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--captions", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--small", action="store_true", help="tiny CLIP and few captions")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args()


def build_clip(small: bool, out: str) -> str:
    torch.manual_seed(0)
    if small:
        tower = dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2
        )
        config = CLIPConfig(
            text_config=tower,
            vision_config=dict(tower, image_size=32, patch_size=8),
            projection_dim=16,
        )
    else:
        config = CLIPConfig()  # the openai/clip-vit-base-patch32 architecture
    CLIPModel(config).save_pretrained(out)
    side = config.vision_config.image_size  # the processor crops to what the tower reads
    pixels = CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    )
    CLIPProcessor(image_processor=pixels, tokenizer=clip_tokenizer()).save_pretrained(out)
    return out


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 64 if args.small else args.captions
    rng = random.Random(0)
    captions = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(n)]
    with tempfile.TemporaryDirectory() as tmp:
        clip = load_clip("hf:" + build_clip(args.small, tmp))
        clip.encode_texts(captions[:4])  # warm-up
        start = time.perf_counter()
        single = torch.cat([clip.encode_texts([c], batch_size=1) for c in captions])
        t_single = time.perf_counter() - start
        start = time.perf_counter()
        batched = clip.encode_texts(captions, batch_size=args.batch_size)
        t_batched = time.perf_counter() - start
    torch.testing.assert_close(single, batched, atol=1e-4, rtol=1e-4)
    print(
        f"captions: {n}, torch threads: {torch.get_num_threads()}, model: {'tiny' if args.small else 'ViT-B/32 text tower'}"
    )
    print(f"{'path':<28}{'seconds':>10}{'captions/s':>14}")
    print(f"{'one caption at a time':<28}{t_single:>10.2f}{n / t_single:>14.1f}")
    print(f"{'batched (' + str(args.batch_size) + ')':<28}{t_batched:>10.2f}{n / t_batched:>14.1f}")
    print(f"speed-up (batched / one at a time): {t_single / t_batched:.1f}x")


if __name__ == "__main__":
    main()
