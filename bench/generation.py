"""Captioning throughput: batched decoding with the KV cache vs ClipCap's way of decoding.

ClipCap's and CapDec's ``generate_beam`` / ``generate2`` caption one image at a time and re-run
the LM over the whole sequence (prefix + tokens so far) at every step. The baseline here is
that: pairfree's ``search="clipcap"`` (the same algorithm, tested equal to a re-derivation of
the original loop) one image at a time without the cache. The fast path runs the same search
batched over images with the KV cache, so their captions must agree (asserted). The LM is
GPT-2-small-sized with random weights (no hub here), so captions rarely reach the stop token
and run to ``--max-new-tokens``: the same work for both paths.

The physical limit on the same model and batch: one teacher-forced forward pass over the same
tokens (every row's prefix and all its new tokens at once, as training runs), in tokens per
second. Decoding must produce its tokens one step at a time, so it reaches only a share of
that; the share is printed for greedy decoding.

    python bench/generation.py             # GPT-2 small shape: 12 layers, 768 wide
    python bench/generation.py --small     # a quick run on a tiny LM
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from pairfree.captioner import CaptionerConfig, PrefixCaptioner

PERIOD = 13  # GPT-2's "." token: CapDec's stop token


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=None, help="default: all images")
    parser.add_argument(
        "--baseline-images",
        type=int,
        default=4,
        help="images the slow per-image path captions (its img/s does not depend on the count)",
    )
    parser.add_argument("--n-layer", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--prefix-length", type=int, default=10)
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="tiny LM and few images")
    args = parser.parse_args()
    if args.small:
        args.images, args.baseline_images, args.n_layer, args.n_embd, args.n_head = 8, 8, 2, 128, 2
        args.max_new_tokens = 12
    return args


def build_model(args: argparse.Namespace) -> PrefixCaptioner:
    torch.manual_seed(args.seed)
    lm_config = GPT2Config(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    config = CaptionerConfig(embed_dim=512, prefix_length=args.prefix_length, mapper="mlp")
    return PrefixCaptioner(config, lm=GPT2LMHeadModel(lm_config)).to(args.device).eval()


def timed(fn) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args)
    condition = torch.randn(args.images, 512, generator=torch.Generator().manual_seed(args.seed))
    condition = condition.to(args.device)
    batch_size = args.batch_size or args.images

    def batched(**kw) -> list[list[int]]:
        chunks = condition.split(batch_size)
        return [seq for chunk in chunks for seq in model.generate(chunk, **kw)]

    baseline = condition[: args.baseline_images]

    def per_image(**kw) -> list[list[int]]:
        return [model.generate(c[None], use_cache=False, **kw)[0] for c in baseline]

    lm = model.lm.config
    print(
        f"LM: GPT-2 shape, {lm.n_layer} layers, {lm.n_embd} wide, vocab {lm.vocab_size} "
        f"(random weights); {args.images} images, prefix {args.prefix_length}, "
        f"max {args.max_new_tokens} new tokens, stop at '.', device {args.device}, "
        f"{torch.get_num_threads()} threads; the per-image path captions the first "
        f"{len(baseline)} images"
    )
    print(f"{'clipcap':<10} {'per-image, no cache':>20} {'batched + KV cache':>20} {'speed-up':>9}")
    for name, num_beams in (("greedy", 1), (f"beam {args.beams}", args.beams)):
        kw = dict(
            num_beams=num_beams,
            max_new_tokens=args.max_new_tokens,
            stop_token_ids=[PERIOD],
            search="clipcap",
        )
        model.generate(condition[:1], **kw)  # warm-up
        slow, slow_s = timed(partial(per_image, **kw))
        fast, fast_s = timed(partial(batched, **kw))
        assert fast[: len(slow)] == slow, f"{name}: batched + cached captions differ"
        slow_rate, fast_rate = len(slow) / slow_s, len(fast) / fast_s
        print(
            f"{name:<10} {slow_rate:>14.2f} img/s {fast_rate:>14.2f} img/s "
            f"{fast_rate / slow_rate:>8.1f}x"
        )
        if num_beams == 1:
            decode_rate = sum(len(x) for x in fast) / fast_s
    forward_rate = teacher_forced_rate(model, condition, batch_size, args.max_new_tokens)
    print("captions identical on the images both paths captioned")
    print(f"greedy decoding {decode_rate:.0f} tokens/s; a teacher-forced forward over the same "
          f"tokens {forward_rate:.0f} tokens/s: decoding runs at "
          f"{decode_rate / forward_rate:.2f}x of it")  # fmt: skip


@torch.no_grad()
def teacher_forced_rate(
    model: PrefixCaptioner, condition: torch.Tensor, batch_size: int, new_tokens: int
) -> float:
    """New tokens per second of one forward pass over prefix + ``new_tokens`` per row."""
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for chunk in condition.split(batch_size):
        ids = torch.randint(0, model.lm.config.vocab_size, (len(chunk), new_tokens),
                            generator=generator).to(chunk.device)  # fmt: skip
        model(chunk, ids, torch.ones_like(ids))
    return len(condition) * new_tokens / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
