"""A small GPT-2 with a word-level world vocabulary: the world's stand-in for pretrained GPT-2.

The world's captions use a few hundred words, so a word-level tokenizer keeps the LM head small
enough to train on a laptop CPU in minutes. The model and tokenizer are saved as ordinary
Hugging Face files and loaded through the same ``from_pretrained`` path as GPT-2.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import (
    BertConfig,
    BertLMHeadModel,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaModel,
)

from pairfree.world.clip import SPECIALS
from pairfree.world.clip_training import resolve_worlds, world_vocabulary

EOS, UNK = "<|endoftext|>", "<unk>"


def world_words() -> list[str]:
    """Every word of the world's captions in every preset (held-out words included, as GPT-2
    knows words a caption corpus never shows): the world CLIP's vocabulary."""
    worlds = resolve_worlds(["default", "shifted", "novel"])
    return [w for w in world_vocabulary(worlds) if w not in SPECIALS]


def world_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    vocab = {EOS: 0, UNK: 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words, fixes " ," " ."
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS, unk_token=UNK
    )


BERT_SPECIALS = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}  # fmt: skip
PROMPT_WORDS = ("a", "picture", "of")  # ICSD's decoder prompt, "a picture of"


def world_bert_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BERT's special tokens (``[CLS]`` ... ``[SEP]``)."""
    names = list(BERT_SPECIALS.values()) + list(dict.fromkeys([*words, *PROMPT_WORDS]))
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(names)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, **BERT_SPECIALS)


def _save_untrained(out_dir: str | Path, seed: int, make_model: Callable, tokenizer=None) -> Path:
    """Build ``make_model(tokenizer)`` under ``seed`` and save it with the tokenizer (default:
    the world's GPT-2-style one)."""
    out = Path(out_dir)
    tokenizer = tokenizer or world_tokenizer(world_words())
    torch.manual_seed(seed)
    make_model(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_world_lm(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 128,
    n_head: int = 4,
    n_positions: int = 96,
    seed: int = 0,
) -> Path:
    """Save a randomly initialized world GPT-2 and its tokenizer to ``out_dir``."""
    return _save_untrained(
        out_dir,
        seed,
        lambda tokenizer: GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tokenizer),
                n_layer=n_layer,
                n_embd=n_embd,
                n_head=n_head,
                n_positions=n_positions,
                bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ),
    )


def build_world_encoder(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    hidden: int = 64,
    n_head: int = 2,
    max_length: int = 64,
    seed: int = 0,
) -> Path:
    """Save a randomly initialized small RoBERTa with the world tokenizer to ``out_dir``: the
    world's stand-in for ``roberta-base`` as the GAN recipes' discriminator encoder."""
    return _save_untrained(
        out_dir,
        seed,
        lambda tokenizer: RobertaModel(
            RobertaConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                intermediate_size=4 * hidden,
                max_position_embeddings=max_length + 2,  # positions start after the pad id
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.eos_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        ),
    )


def build_world_bert(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    hidden: int = 128,
    n_head: int = 4,
    max_length: int = 64,
    seed: int = 0,
) -> Path:
    """Save a randomly initialized small BERT decoder with a word-level world tokenizer that
    has BERT's special tokens: the world's stand-in for ``bert-base-uncased`` as ICSD's text
    decoder (cross-attention is added when it is loaded, as for the real one)."""
    return _save_untrained(
        out_dir,
        seed,
        lambda tokenizer: BertLMHeadModel(
            BertConfig(
                vocab_size=len(tokenizer),
                hidden_size=hidden,
                num_hidden_layers=n_layer,
                num_attention_heads=n_head,
                intermediate_size=4 * hidden,
                max_position_embeddings=max_length,
                pad_token_id=tokenizer.pad_token_id,
                is_decoder=True,
            )
        ),
        world_bert_tokenizer(world_words()),
    )
