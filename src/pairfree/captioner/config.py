"""The captioner's configuration: everything needed to rebuild the module, nothing about training."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MAPPERS = ("mlp", "transformer", "fusion")


@dataclass
class CaptionerConfig:
    """A ClipCap-style prefix captioner: CLIP embedding -> mapper -> k prefix embeddings -> LM."""

    lm: str = "gpt2"
    """Hugging Face hub id or local directory of any causal LM."""
    embed_dim: int = 512
    """Size d of the condition vector (the CLIP embedding)."""
    prefix_length: int = 10
    """Number k of prefix embeddings the mapper produces."""
    mapper: str = "mlp"
    """``"mlp"``, ``"transformer"`` or ``"fusion"`` (IFCap: the transformer reading retrieved
    captions too; its condition is ``[batch, 1 + k, embed_dim]``)."""
    mapper_layers: int = 8
    """Depth of the transformer (and fusion) mapper."""
    clip_length: int = 10
    """Number of tokens the transformer mapper splits the condition into."""
    only_prefix: bool = False
    """Freeze the LM and train only the mapper."""

    def __post_init__(self) -> None:
        if self.mapper not in MAPPERS:
            raise ValueError(f"mapper must be one of {MAPPERS}, got {self.mapper!r}")
        for name in ("embed_dim", "prefix_length", "mapper_layers", "clip_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CaptionerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown captioner config keys: {unknown}")
        return cls(**d)
