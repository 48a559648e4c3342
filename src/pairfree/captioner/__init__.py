"""The shared prefix captioner (ClipCap architecture): model, conditioning, decoding,
checkpoints and their cards, importers."""

from pairfree.captioner.card import CheckpointCard
from pairfree.captioner.checkpoint import load_captioner, save_captioner
from pairfree.captioner.conditioning import (
    Conditioning,
    condition,
    load_offset,
    modality_offset,
    save_offset,
)
from pairfree.captioner.config import CaptionerConfig
from pairfree.captioner.convert import import_clipcap_state_dict, load_original_checkpoint
from pairfree.captioner.generation import GenerationConfig
from pairfree.captioner.model import CaptionerOutput, PrefixCaptioner, caption_log_probs

__all__ = [
    "CaptionerConfig",
    "CaptionerOutput",
    "CheckpointCard",
    "Conditioning",
    "GenerationConfig",
    "PrefixCaptioner",
    "caption_log_probs",
    "condition",
    "import_clipcap_state_dict",
    "load_captioner",
    "load_offset",
    "load_original_checkpoint",
    "modality_offset",
    "save_captioner",
    "save_offset",
]
