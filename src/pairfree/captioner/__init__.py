"""The shared prefix captioner (ClipCap architecture): model, decoding, checkpoints, importers."""

from pairfree.captioner.checkpoint import load_captioner, save_captioner
from pairfree.captioner.config import CaptionerConfig
from pairfree.captioner.convert import import_clipcap_state_dict, load_original_checkpoint
from pairfree.captioner.model import CaptionerOutput, PrefixCaptioner, caption_log_probs

__all__ = [
    "CaptionerConfig",
    "CaptionerOutput",
    "PrefixCaptioner",
    "caption_log_probs",
    "import_clipcap_state_dict",
    "load_captioner",
    "load_original_checkpoint",
    "save_captioner",
]
