"""Captioner checkpoints: a directory with ``model.safetensors``, ``config.json`` and the
tokenizer files.

``config.json`` holds the model family (``"prefix"``: ClipCap's; ``"cross_attention"``: SaCap's
and ICSD's), its config, the LM's own config and the typed checkpoint card (recipe, CLIP,
conditioning, decoding). Loading rebuilds the LM from that config, so it needs neither the hub
nor the training code, and never unpickles anything.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import (
    CONFIG_MAPPING,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)

from pairfree.captioner.card import CheckpointCard
from pairfree.captioner.config import CaptionerConfig
from pairfree.captioner.cross_attention import CrossAttentionCaptioner, CrossAttentionConfig
from pairfree.captioner.model import PrefixCaptioner
from pairfree.clip import ClipEncoder, load_clip
from pairfree.errors import BadInputError, PairfreeError
from pairfree.io import atomic_write_json, read_json_config

FORMAT = "pairfree-captioner"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
FAMILIES = {"prefix": PrefixCaptioner, "cross_attention": CrossAttentionCaptioner}
AnyCaptioner = PrefixCaptioner | CrossAttentionCaptioner


@contextmanager
def _atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` on success.

    Replacing an existing directory takes two renames (old aside, new in); a crash between
    them leaves the old checkpoint beside ``path`` as ``.<name>.*.old``, never a partial one.
    """
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def family_of(model: AnyCaptioner) -> str:
    """The family name a checkpoint of ``model`` records."""
    return next(name for name, cls in FAMILIES.items() if isinstance(model, cls))


def save_captioner(
    model: AnyCaptioner,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    card: CheckpointCard,
    *,
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write the captioner to ``out_dir`` atomically (replacing any previous checkpoint);
    ``extra(folder)`` adds files of its own before the folder takes ``out_dir``'s place."""
    meta = {
        "format": FORMAT,
        "family": family_of(model),
        "captioner": model.config.to_dict(),
        "lm_config": model.lm.config.to_dict(),
        "card": card.to_dict(),
    }
    with _atomic_dir(Path(out_dir)) as tmp:
        save_model(model, str(tmp / WEIGHTS_NAME))
        atomic_write_json(tmp / CONFIG_NAME, meta)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)


def read_card(path: str | Path) -> CheckpointCard:
    """The card of the checkpoint at ``path``, without loading its weights."""
    config_path = Path(path) / CONFIG_NAME
    meta = read_json_config(config_path, FORMAT, "pairfree captioner")
    if "card" not in meta:
        raise BadInputError(config_path, 'no "card" (written by an older pairfree?)')
    try:
        return CheckpointCard.from_dict(meta["card"])
    except PairfreeError as e:
        raise BadInputError(config_path, str(e)) from e


def load_captioner(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    clip: ClipEncoder | None = None,
) -> tuple[AnyCaptioner, PreTrainedTokenizerBase, CheckpointCard]:
    """Load a checkpoint written by :func:`save_captioner`; returns the model in eval mode,
    its tokenizer and its card. A checkpoint without a family is a prefix captioner (all were
    before cross-attention captioners existed). A captioner with its own image tower takes the
    tower's architecture from ``clip`` (default: the CLIP its card names), at the resolution
    it was trained at."""
    path = Path(path)
    config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
    meta = read_json_config(config_path, FORMAT, "pairfree captioner")
    card = read_card(path)
    if not weights_path.is_file():
        raise BadInputError(weights_path, "missing: not a pairfree captioner checkpoint")
    family = meta.get("family", "prefix")
    if family not in FAMILIES:
        raise BadInputError(config_path, f"unknown captioner family {family!r}; known: "
                            f"{sorted(FAMILIES)}")  # fmt: skip
    config_class = CaptionerConfig if family == "prefix" else CrossAttentionConfig
    try:
        config = config_class.from_dict(meta["captioner"])
        lm_config_dict = dict(meta["lm_config"])
        lm_config = CONFIG_MAPPING[lm_config_dict["model_type"]].from_dict(lm_config_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(config_path, f"bad captioner or LM config: {e!r}") from e

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInputError(path, f"cannot load the tokenizer: {e}") from e
    lm = AutoModelForCausalLM.from_config(lm_config)
    if family == "prefix":
        model = PrefixCaptioner(config, lm=lm)
    else:
        separator = tokenizer(config.separator, add_special_tokens=False)["input_ids"]
        vision = None
        if config.image_encoder:
            encoder = clip or load_clip(card.clip, device=device)
            try:
                vision = encoder.vision_tower(config.image_size)
            except PairfreeError as e:
                raise BadInputError(config_path, f"its image tower: {e}") from e
        model = CrossAttentionCaptioner(config, lm, separator_ids=separator, vision=vision)
    try:
        load_model(model, weights_path, strict=True)
    except SafetensorError as e:
        raise BadInputError(weights_path, f"damaged or not a safetensors file ({e})") from e
    except RuntimeError as e:
        raise BadInputError(weights_path, f"weights do not match the config: {e}") from e
    return model.to(device).eval(), tokenizer, card
