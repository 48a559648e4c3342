"""Captioning throughput: batched decoding with the KV cache vs ClipCap's way of decoding.

ClipCap's and CapDec's ``generate_beam`` / ``generate2`` caption one image at a time and re-run
the LM over the whole sequence (prefix + tokens so far) at every step, computing its logits at
every position. The baseline is that loop (``bench/clipcap_original.py``, the reference the
tests hold pairfree's ``search="clipcap"`` to). The fast path is pairfree's ``search="clipcap"``
batched over images on the KV cache; the two must give the same captions (asserted). The LM is
GPT-2-small-sized with random weights (no hub here), so captions rarely reach the stop token and
run to ``--max-new-tokens``: the same work for both paths.

The physical limit on the same model and batch: one teacher-forced forward pass over the same
tokens (every row's prefix and all its new tokens at once, as training runs, with logits at
the new tokens), in new tokens per second. Decoding must produce its tokens one step at a
time, so it reaches only a share of that; the share is printed for greedy decoding.

The "work ratio" column is the ratio of the two paths' matrix-multiply work per image: what the
speed-up would be if both ran their multiplies equally efficiently (the batched path runs
bigger ones; the per-image path's are small), so a speed-up far beyond it is not to be
expected.

The prefix is 40 tokens by default, as in CapDec's configs (``configs/capdec``), whose
search this is; ``--prefix-length 10`` is ClipCap's MLP-mapper shape (and CgT-GAN's).

    python bench/generation.py                      # GPT-2 small shape: 12 layers, 768 wide
    python bench/generation.py --prefix-length 10   # a short prefix: less to save
    python bench/generation.py --small              # a quick run on a tiny LM
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import clipcap_original
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
    parser.add_argument(
        "--prefix-length",
        type=int,
        default=40,
        help="prefix tokens: 40 as CapDec's configs (whose search this is), 10 as ClipCap's MLP",
    )
    parser.add_argument("--beams", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of the fast path (fastest kept)"
    )
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


def timed(fn, repeats: int = 1) -> tuple[list[list[int]], float]:
    """The output and the fastest of ``repeats`` wall-clock times (the first run of a batch
    also pays for its first touch of memory)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, min(times)


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

    with torch.no_grad():
        baseline = model.prefix_embeds(condition[: args.baseline_images])

    def per_image(num_beams: int, max_new_tokens: int, **_) -> list[list[int]]:
        if num_beams == 1:
            return [
                clipcap_original.greedy(model.lm, p, max_new_tokens, {PERIOD}) for p in baseline
            ]
        return [
            clipcap_original.beam_search(model.lm, p, num_beams, max_new_tokens, PERIOD)[0]
            for p in baseline
        ]

    lm = model.lm.config
    print(
        f"LM: GPT-2 shape, {lm.n_layer} layers, {lm.n_embd} wide, vocab {lm.vocab_size} "
        f"(random weights); {args.images} images, prefix {args.prefix_length}, "
        f"max {args.max_new_tokens} new tokens, stop at '.', device {args.device}, "
        f"{torch.get_num_threads()} threads; the per-image path captions the first "
        f"{len(baseline)} images"
    )
    print(f"{'clipcap':<10} {'per-image, no cache':>20} {'batched + KV cache':>20} {'speed-up':>9} "
          f"{'work ratio':>11}")  # fmt: skip
    for name, num_beams in (("greedy", 1), (f"beam {args.beams}", args.beams)):
        kw = dict(
            num_beams=num_beams,
            max_new_tokens=args.max_new_tokens,
            stop_token_ids=[PERIOD],
            search="clipcap",
        )
        model.generate(condition[:1], **kw)  # warm-up
        slow, slow_s = timed(partial(per_image, **kw))
        fast, fast_s = timed(partial(batched, **kw), repeats=args.repeats)
        assert fast[: len(slow)] == slow, f"{name}: batched + cached captions differ"
        slow_rate, fast_rate = len(slow) / slow_s, len(fast) / fast_s
        bound = work_ratio(lm, args.prefix_length, args.max_new_tokens, num_beams)
        print(
            f"{name:<10} {slow_rate:>14.2f} img/s {fast_rate:>14.2f} img/s "
            f"{fast_rate / slow_rate:>8.1f}x {bound:>10.1f}x"
        )
        if num_beams == 1:
            decode_rate = sum(len(x) for x in fast) / fast_s
    forward_rate = teacher_forced_rate(model, condition, batch_size, args.max_new_tokens)
    print("captions identical on the images both paths captioned; 'work ratio': the ratio of the "
          "two paths' matrix-multiply work per image (captions run to the maximum length), the "
          "speed-up at equal efficiency")  # fmt: skip
    print(f"greedy decoding {decode_rate:.0f} tokens/s; a teacher-forced forward over the same "
          f"tokens {forward_rate:.0f} tokens/s: decoding runs at "
          f"{decode_rate / forward_rate:.2f}x of it")  # fmt: skip


def work_ratio(lm: GPT2Config, prefix: int, new_tokens: int, beams: int) -> float:
    """Multiply-adds per image of ClipCap's loop over those of the cached batched path.

    A token through the transformer costs ``12 d^2`` per layer (attention projections 4 d^2, MLP
    8 d^2), its logits ``d V``. ClipCap's loop re-runs the prefix and every token so far at each
    step, with logits at every position, for 1 row at the first step and ``beams`` rows after.
    The cached path runs the prefix once (logits for its last position) and then one token per
    row and step.
    """
    token, logits = 12 * lm.n_layer * lm.n_embd**2, lm.n_embd * lm.vocab_size
    rerun = sum((1 if t == 0 else beams) * (prefix + t) for t in range(new_tokens))
    cached = prefix * token + logits + (new_tokens - 1) * beams * (token + logits)
    return rerun * (token + logits) / cached


@torch.no_grad()
def teacher_forced_rate(
    model: PrefixCaptioner, condition: torch.Tensor, batch_size: int, new_tokens: int
) -> float:
    """New tokens per second of one forward pass over prefix + ``new_tokens`` per row, with
    logits at the new tokens only (the ones decoding computes)."""
    generator = torch.Generator().manual_seed(0)
    embed = model.lm.get_input_embeddings()
    start = time.perf_counter()
    for chunk in condition.split(batch_size):
        ids = torch.randint(0, model.lm.config.vocab_size, (len(chunk), new_tokens),
                            generator=generator).to(chunk.device)  # fmt: skip
        embeds = torch.cat((model.prefix_embeds(chunk), embed(ids)), dim=1)
        model.lm(inputs_embeds=embeds, logits_to_keep=new_tokens)
    return len(condition) * new_tokens / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
