"""Pick a CLIP backend by name.

A spec is ``"<backend>:<model>"``, e.g. ``hf:openai/clip-vit-base-patch32``,
``hf:/path/to/saved/clip``, ``open_clip:RN50x4/openai`` or ``open_clip:ViT-B-32@/ckpt.pt``.
Built-in backends are imported only when named, so `import pairfree` stays light.
"""

from __future__ import annotations

import torch

from pairfree.backends import resolve_backend
from pairfree.clip.base import ClipEncoder
from pairfree.errors import load_failure

# prefix -> "module:function"; each function takes (model, *, device, dtype).
_BUILTIN: dict[str, str] = {
    "hf": "pairfree.clip.hf:load_hf_clip",
    "open_clip": "pairfree.clip.openclip:load_open_clip",
    "world": "pairfree.world.clip:load_world_clip",
}


def clip_backends() -> list[str]:
    return sorted(_BUILTIN)


def load_clip(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ClipEncoder:
    """Build the frozen encoder named by ``spec`` (see module docstring)."""
    factory, model = resolve_backend(spec, _BUILTIN, "CLIP")
    try:
        return factory(model, device=device, dtype=dtype)
    except OSError as err:  # hub or file problems from transformers / open_clip
        raise load_failure(f"CLIP {spec!r}", model, err) from err
