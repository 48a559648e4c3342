"""Pick a CLIP backend by name.

A spec is ``"<backend>:<model>"``, e.g. ``hf:openai/clip-vit-base-patch32``,
``hf:/path/to/saved/clip``, ``open_clip:RN50x4/openai`` or ``open_clip:ViT-B-32@/ckpt.pt``.
Built-in backends are imported only when named, so `import pairfree` stays light; others come
from :func:`register_clip_backend` or a package's ``pairfree.clip`` entry point (the shapes
world's ``world:`` is one).
"""

from __future__ import annotations

import torch

from pairfree.backends import BackendRegistry, Factory
from pairfree.clip.base import ClipEncoder
from pairfree.errors import load_failure

# each factory takes (model, *, device, dtype) and returns a ClipEncoder
CLIP_BACKENDS = BackendRegistry(
    "CLIP",
    "pairfree.clip",
    {"hf": "pairfree.clip.hf:load_hf_clip", "open_clip": "pairfree.clip.openclip:load_open_clip"},
)


def register_clip_backend(prefix: str, factory: Factory, *, replace: bool = False) -> None:
    """Make ``--clip <prefix>:<model>`` call ``factory(model, device=..., dtype=...)``, which
    returns a :class:`~pairfree.clip.base.ClipEncoder`."""
    CLIP_BACKENDS.register(prefix, factory, replace=replace)


def clip_backends() -> list[str]:
    return CLIP_BACKENDS.names()


def load_clip(
    spec: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ClipEncoder:
    """Build the frozen encoder named by ``spec`` (see module docstring)."""
    factory, model = CLIP_BACKENDS.resolve(spec)
    try:
        return factory(model, device=device, dtype=dtype)
    except OSError as err:  # hub or file problems from transformers / open_clip
        raise load_failure(f"CLIP {spec!r}", model, err) from err
