"""``pairfree import-checkpoint``: original ClipCap/CapDec ``.pt`` -> pairfree checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import positive_int


def register(sub) -> None:
    p = sub.add_parser(
        "import-checkpoint",
        help="convert an original ClipCap/CapDec .pt state dict into a pairfree checkpoint",
        description=(
            "Read an original ClipCap/CapDec checkpoint (a state dict saved with torch.save; "
            "loaded with weights_only=True, nothing is unpickled) and write a pairfree "
            "captioner checkpoint that gives the same logits. Sizes are inferred from the "
            "state dict where they can be."
        ),
    )
    p.add_argument("checkpoint", type=Path, help="original .pt file")
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument(
        "--mapper",
        choices=["mlp", "transformer"],
        required=True,
        help="mapping type it was trained with",
    )
    p.add_argument(
        "--prefix-length", type=positive_int, required=True, help="k (ClipCap COCO: 10; CapDec: 40)"
    )
    p.add_argument(
        "--clip-length", type=positive_int, default=None, help="k_clip of a transformer mapper"
    )
    p.add_argument("--num-layers", type=positive_int, default=None, help="transformer mapper depth")
    p.add_argument(
        "--clip",
        default="open_clip:RN50x4/openai",
        help="CLIP spec to record (CapDec: RN50x4; ClipCap: ViT-B/32)",
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer dir or hub id (default: GPT-2's BPE, offline)"
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="the model expects normalized CLIP embeddings (CapDec)",
    )
    p.add_argument("--stop", default=".", help="stop text for decoding (default '.')")
    p.add_argument(
        "--lm-config",
        default=None,
        help="LM config dir or hub id, if its shape cannot be read off the tensors (GPT-2's can)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pairfree.captioner import (
        CheckpointCard,
        Conditioning,
        GenerationConfig,
        load_original_checkpoint,
        save_captioner,
    )
    from pairfree.io import check_output
    from pairfree.locks import output_lock
    from pairfree.tokenizers import gpt2_tokenizer

    check_output(args.out, inputs=[args.checkpoint], folder=True)
    with output_lock(args.out):
        lm_config = None
        if args.lm_config:
            from transformers import AutoConfig

            lm_config = AutoConfig.from_pretrained(args.lm_config)
        model = load_original_checkpoint(
            args.checkpoint,
            lm_config=lm_config,
            mapper=args.mapper,
            prefix_length=args.prefix_length,
            clip_length=args.clip_length,
            num_layers=args.num_layers,
        )
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        else:
            tokenizer = gpt2_tokenizer()
        card = CheckpointCard(
            recipe="imported",
            clip=args.clip,
            conditioning=Conditioning(normalize=args.normalize),
            # as the original generate_beam: its beam search, beam 5, 67 tokens, no end-of-text stop
            generation=GenerationConfig(
                num_beams=5, max_new_tokens=67, stop=args.stop, search="clipcap", stop_at_eos=False
            ),
            source=str(args.checkpoint),
        )
        save_captioner(model, tokenizer, args.out, card)
        n = sum(p.numel() for p in model.parameters())
        print(f"imported {args.checkpoint} ({n / 1e6:.1f}M parameters) -> {args.out}")
        return 0
