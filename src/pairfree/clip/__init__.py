"""CLIP encoders behind one protocol, chosen by name."""

from pairfree.clip.base import ClipEncoder
from pairfree.clip.registry import clip_backends, load_clip, register_clip_backend

__all__ = ["ClipEncoder", "clip_backends", "load_clip", "register_clip_backend"]
