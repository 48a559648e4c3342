"""Captioner checkpoints: a directory with ``model.safetensors``, ``config.json`` and the
tokenizer files.

``config.json`` holds the model family (``"prefix"``: ClipCap's; ``"cross_attention"``: SaCap's
and ICSD's; ``"pcm"``: PCM-Net's encoder-decoder, which has no pretrained LM), its config, the
LM's own config and the typed checkpoint card (recipe, CLIP, conditioning, decoding). Loading
rebuilds the LM from that config, so it needs neither the hub nor the training code, and never
unpickles anything.

A checkpoint may come from anyone (a Hub repository), so before anything in it is read the
folder is checked (:func:`check_files`): a pickle (``pytorch_model.bin``, ``.pkl``, ``.pt``), a
file pairfree does not write, or a link leading out of it is refused in one line naming the
file, as is a config from a newer pairfree (``format_version``) or with keys this one does not
know. The files its card names (feature stores) must lie inside it (:func:`card_path`); only a
local folder (a training run's checkpoint names its stores by absolute path) may name
absolute paths, and only a local folder's card may name its CLIP by a path on this machine.
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
from pairfree.captioner.pcm import PCMCaptioner, PCMConfig
from pairfree.clip import ClipEncoder, load_clip
from pairfree.errors import BadInputError, PairfreeError
from pairfree.io import atomic_write_json, read_json_config

FORMAT = "pairfree-captioner"
# bumped when config.json changes so that an older pairfree would misread it; a checkpoint
# written before the field existed is version 1
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TRAINING_NAME = "training.json"  # what the run that made a checkpoint recorded
# feature stores a saved copy carries (its conditioning's)
STORE_FOLDERS = ("memory", "phrases", "entities", "retrieval", "retrieval-keys")
_META_KEYS = {"format", "format_version", "family", "captioner", "lm_config", "card"}
# files a checkpoint holds: pairfree's own, a model card, git's attributes (every Hub repo has
# them) and a tokenizer's (sentencepiece ``.model`` files are protobuf, not pickles)
_KNOWN_FILES = {
    CONFIG_NAME, WEIGHTS_NAME, TRAINING_NAME, "README.md", ".gitattributes", "tokenizer.json",
    "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "vocab.txt", "chat_template.jinja", "chat_template.json",
}  # fmt: skip
_PICKLE_SUFFIXES = {".bin", ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".joblib", ".dill"}
_NOT_READ = {".git", ".cache"}  # a git clone's or `hf download --local-dir`'s bookkeeping
FAMILIES = {"prefix": PrefixCaptioner, "cross_attention": CrossAttentionCaptioner,
            "pcm": PCMCaptioner}  # fmt: skip
CONFIGS = {"prefix": CaptionerConfig, "cross_attention": CrossAttentionConfig, "pcm": PCMConfig}
AnyCaptioner = PrefixCaptioner | CrossAttentionCaptioner | PCMCaptioner


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
        "format_version": FORMAT_VERSION,
        "family": family_of(model),
        "captioner": model.config.to_dict(),
        "lm_config": model.lm.config.to_dict() if hasattr(model, "lm") else None,
        "card": card.to_dict(),
    }
    with _atomic_dir(Path(out_dir)) as tmp:
        save_model(model, str(tmp / WEIGHTS_NAME))
        atomic_write_json(tmp / CONFIG_NAME, meta)
        tokenizer.save_pretrained(tmp)
        if extra is not None:
            extra(tmp)


def snapshot_repo(path: str | Path) -> Path | None:
    """The Hugging Face cache folder of the repository whose snapshot ``path`` is (its files
    are links into the repository's ``blobs/``), else None: ``path`` is a local folder."""
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent
    return None


def _inside(root: str, real: str) -> bool:
    return os.path.commonpath([root, real]) == root


def _known(relative: Path) -> bool:
    if len(relative.parts) == 1:
        return relative.name in _KNOWN_FILES or relative.suffix == ".model"
    folder, name = relative.parts[0], relative.name
    return (len(relative.parts) == 2 and folder in STORE_FOLDERS
            and name.startswith(("manifest.", "shard-")) and relative.suffix in (".json", ".npy"))  # fmt: skip


def check_files(path: str | Path) -> None:
    """Refuse, before anything in it is read, a checkpoint folder holding a pickle, a file
    pairfree does not write, or a link out of it (for a Hub snapshot: out of its repository's
    cache folder, whose ``blobs/`` its links point into), naming the file."""
    path = Path(path)
    root = os.path.realpath(snapshot_repo(path) or path)
    for folder, dirs, files in os.walk(path):
        if folder == str(path):
            dirs[:] = [d for d in dirs if d not in _NOT_READ]
        for name in sorted(dirs) + sorted(files):
            entry = Path(folder) / name
            real = os.path.realpath(entry)
            if not _inside(root, real):
                raise BadInputError(entry, f"links outside the checkpoint (to {real}); a "
                                    "checkpoint reads nothing outside itself")  # fmt: skip
        for name in sorted(files):
            entry = Path(folder) / name
            if entry.suffix.lower() in _PICKLE_SUFFIXES:
                raise BadInputError(entry, "a pickle: pairfree reads safetensors only and never "
                                    "unpickles (remove it; an original ClipCap .pt converts "
                                    "with pairfree import-checkpoint)")  # fmt: skip
            if not _known(entry.relative_to(path)):
                raise BadInputError(entry, "not a file a pairfree checkpoint holds (config.json, "
                                    "model.safetensors, tokenizer files, README.md, training."
                                    "json, memory/, phrases/, entities/); remove it")  # fmt: skip


def card_path(checkpoint: str | Path, value: str, what: str) -> str:
    """Where a file named on ``checkpoint``'s card (``what``: the card's field) lies: a
    relative name inside the checkpoint, never out of it; an absolute one only in a local
    folder (a training run's checkpoint names its stores so), never in a Hub snapshot."""
    checkpoint = Path(checkpoint)
    config_path = checkpoint / CONFIG_NAME
    if Path(value).is_absolute():
        if snapshot_repo(checkpoint) is not None:
            raise BadInputError(config_path, f"{what} {value!r} is outside the snapshot: a Hub "
                                "checkpoint names its files relative to itself")  # fmt: skip
        return value
    if not _inside(os.path.realpath(checkpoint), os.path.realpath(checkpoint / value)):
        raise BadInputError(config_path, f"{what} {value!r} leads outside the checkpoint")
    return str(checkpoint / value)


def check_clip_spec(checkpoint: str | Path, spec: str) -> None:
    """Refuse a Hub snapshot's card naming its CLIP by a path on this machine
    (``hf:/home/...``, ``open_clip:ViT-B-32@../x.pt``): a Hub checkpoint names a Hub CLIP."""
    if snapshot_repo(checkpoint) is None:
        return
    _, _, model = spec.partition(":")
    for part in model.split("@"):
        if part.startswith(("/", "~", ".")) or "\\" in part:
            raise BadInputError(Path(checkpoint) / CONFIG_NAME, f"its CLIP {spec!r} is a path on "
                                "this machine, outside the snapshot")  # fmt: skip


def _read_meta(path: Path) -> dict:
    """``config.json``, checked to be one this version can read."""
    config_path = path / CONFIG_NAME
    meta = read_json_config(config_path, FORMAT, "pairfree captioner")
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise BadInputError(config_path, f"format_version {version!r} is not a version")
    if version > FORMAT_VERSION:
        raise BadInputError(config_path, f"format_version {version} is from a newer pairfree "
                            f"(this one reads up to {FORMAT_VERSION}): upgrade pairfree")  # fmt: skip
    unknown = sorted(set(meta) - _META_KEYS)
    if unknown:
        raise BadInputError(config_path, f"unknown keys {unknown} (written by a newer "
                            "pairfree?)")  # fmt: skip
    return meta


def read_card(path: str | Path) -> CheckpointCard:
    """The card of the checkpoint at ``path``, without loading its weights; the folder's
    files are checked first (:func:`check_files`)."""
    check_files(path)
    config_path = Path(path) / CONFIG_NAME
    meta = _read_meta(Path(path))
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
    card = read_card(path)
    meta = _read_meta(path)
    if not weights_path.is_file():
        raise BadInputError(weights_path, "missing: not a pairfree captioner checkpoint")
    family = meta.get("family", "prefix")
    if family not in FAMILIES:
        raise BadInputError(config_path, f"unknown captioner family {family!r}; known: "
                            f"{sorted(FAMILIES)}")  # fmt: skip
    try:
        config = CONFIGS[family].from_dict(meta["captioner"])
        lm_config = None
        if family != "pcm":
            lm_config_dict = dict(meta["lm_config"])
            lm_config = CONFIG_MAPPING[lm_config_dict["model_type"]].from_dict(lm_config_dict)
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(config_path, f"bad captioner or LM config: {e!r}") from e

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInputError(path, f"cannot load the tokenizer: {e}") from e
    if family == "pcm":
        model = PCMCaptioner(config)
    elif family == "prefix":
        model = PrefixCaptioner(config, lm=AutoModelForCausalLM.from_config(lm_config))
    else:
        separator = tokenizer(config.separator, add_special_tokens=False)["input_ids"]
        vision = None
        if config.image_encoder:
            encoder = clip or load_clip(card.clip, device=device)
            try:
                vision = encoder.vision_tower(config.image_size)
            except PairfreeError as e:
                raise BadInputError(config_path, f"its image tower: {e}") from e
        lm = AutoModelForCausalLM.from_config(lm_config)
        model = CrossAttentionCaptioner(config, lm, separator_ids=separator, vision=vision)
    try:
        load_model(model, weights_path, strict=True)
    except SafetensorError as e:
        raise BadInputError(weights_path, f"damaged or not a safetensors file ({e})") from e
    except RuntimeError as e:
        raise BadInputError(weights_path, f"weights do not match the config: {e}") from e
    return model.to(device).eval(), tokenizer, card
