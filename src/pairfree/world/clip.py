"""The world CLIP: a small two-tower encoder trained on the shapes world, and its backend.

- The image tower is a CNN whose last feature map is pooled by attention with positional
  embeddings (CLIP's ResNet ``AttentionPool2d``), so where objects sit survives pooling.
- The text tower is a small causal transformer with positional embeddings over a word-level
  vocabulary read from the world's own captions, read out at ``<eos>``; it sees word order, so "a purple square and a white cross" and "a white
  square and a purple cross" get different embeddings (a mean-pooled tower could not).
- The modality gap is built in and controlled, in its two parts:
  - a centroid gap: each tower's output is the unit content vector, kept orthogonal to a
    fixed gap direction ``u``, tilted toward ``+u`` (images) or ``-u`` (texts) by
    ``gap / 2``. The centroids are then at least ``gap`` apart, as real CLIP's are (about
    0.8 for ViT-B/32 on COCO, Liang et al. 2022); every image-text cosine shifts by the same
    amount, so rankings do not change;
  - a per-sample disagreement (``modality_specific`` = a): the content is mixed as
    ``sqrt(1 - a^2) content + a specific`` with a component only its own modality has: the
    caption's surface form for texts (a fixed random projection of its bag of words, so
    synonyms and templates move it) and low-resolution pixel detail for images (a fixed
    random projection of a 16x16 thumbnail, so jitter and noise move it). Real CLIP's paired
    embeddings disagree per sample far more than a centroid shift explains; a decoder trained
    on clean text embeddings learns to read the text-only part and fails on images. That
    disagreement, not the centroid alone, is what CapDec's noise injection covers.

A checkpoint is a directory with ``model.safetensors`` and ``config.json`` (config,
vocabulary, training metrics), written atomically.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_model, save_model
from torch import nn

from pairfree.clip.batching import BatchedClipEncoder
from pairfree.clip.vision import PixelSpec, VisionTower, tower_resolution
from pairfree.errors import BadInputError, PairfreeError
from pairfree.io import atomic_path, atomic_write_json, read_json_config

FORMAT = "pairfree-world-clip"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
THUMBNAIL_SIDE = 16  # the image-specific component reads a 16x16 thumbnail
_WORD = re.compile(r"[a-z]+|\d+|[,;:.]")


def split_words(text: str) -> list[str]:
    """Lowercased words, numbers and punctuation marks: the units of the text tower."""
    return _WORD.findall(text.lower().replace("-", " "))


def build_vocabulary(texts: Iterable[str]) -> list[str]:
    """The special tokens, then every word of ``texts`` in sorted order."""
    words = sorted({w for text in texts for w in split_words(text)})
    return [*SPECIALS, *words]


@dataclass
class WorldClipConfig:
    """Sizes of the two towers and the target modality gap (0 <= gap < 2). An empty
    vocabulary is filled from the world's captions by training."""

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 192)
    strides: tuple[int, ...] = (2, 2, 2, 1)
    attention_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_context: int = 64
    embed_dim: int = 64
    gap: float = 0.8
    modality_specific: float = 0.0  # a: weight (as a sine) of each modality's own component
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    image_mean: tuple[float, float, float] = (0.15, 0.15, 0.15)
    image_std: tuple[float, float, float] = (0.25, 0.25, 0.25)
    vocabulary: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.channels, self.strides = tuple(self.channels), tuple(self.strides)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)
        if len(self.channels) != len(self.strides) or not self.channels:
            raise ValueError("channels and strides must be non-empty and of equal length")
        if self.image_size % self.reduction:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by the tower's total stride "
                f"{self.reduction}"
            )
        if not 0.0 <= self.gap < 2.0:
            raise ValueError(f"gap must be in [0, 2), got {self.gap}")
        if not 0.0 <= self.modality_specific < 1.0:
            raise ValueError(f"modality_specific must be in [0, 1), got {self.modality_specific}")
        if self.channels[-1] % self.attention_heads:
            raise ValueError("the last channel count must be divisible by attention_heads")
        if self.text_context < 3 or self.text_width % self.text_heads:
            raise ValueError("need text_context >= 3 and text_width divisible by text_heads")
        if self.vocabulary and list(self.vocabulary[: len(SPECIALS)]) != list(SPECIALS):
            raise ValueError(f"the vocabulary must start with the special tokens {SPECIALS}")

    @property
    def reduction(self) -> int:
        return math.prod(self.strides)

    @property
    def grid_side(self) -> int:
        return self.image_size // self.reduction

    def to_dict(self) -> dict:
        return asdict(self)


class AttentionPool2d(nn.Module):
    """CLIP's pooling: the mean token attends over the positioned grid tokens."""

    def __init__(self, tokens: int, width: int, heads: int, out_dim: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(tokens + 1, width) / width**0.5)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.proj = nn.Linear(width, out_dim)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        x = torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1) + self.position
        pooled, _ = self.attention(x[:, :1], x, x, need_weights=False)
        return self.proj(pooled[:, 0])


def feature_tokens(features: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """[N, H*W, C] tokens of the last feature map, row-major."""
    return features(pixels).flatten(2).transpose(1, 2)


class ImageTower(nn.Module):
    def __init__(self, config: WorldClipConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = 3
        for out, stride in zip(config.channels, config.strides, strict=True):
            layers += [
                nn.Conv2d(width, out, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            width = out
        self.features = nn.Sequential(*layers)
        self.pool = AttentionPool2d(
            config.grid_side**2, width, config.attention_heads, config.embed_dim
        )

    def grid(self, pixels: torch.Tensor) -> torch.Tensor:
        return feature_tokens(self.features, pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.grid(pixels))


class TextTower(nn.Module):
    """A small causal pre-norm transformer with learned positions, read out at ``<eos>`` as
    CLIP's text tower is. Each word sees only the words before it, so "purple square" and
    "square ... purple" build different states: order matters from the start, unlike in a
    mean over word vectors."""

    def __init__(self, config: WorldClipConfig) -> None:
        super().__init__()
        width = config.text_width
        # Word and position vectors start on the same small scale (as in CLIP), so word order
        # shows in the embedding from the first step instead of being drowned by word identity.
        self.embed = nn.Embedding(len(config.vocabulary), width, padding_idx=0)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.position = nn.Parameter(torch.randn(config.text_context, width) * 0.02)
        layer = nn.TransformerEncoderLayer(
            width,
            config.text_heads,
            dim_feedforward=4 * width,
            dropout=0.0,
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.embed_dim)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.position[: ids.shape[1]]
        length = ids.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).triu(1)
        x = self.layers(x, mask=causal, src_key_padding_mask=ids == 0, is_causal=True)
        eos = x[torch.arange(ids.shape[0], device=ids.device), lengths.to(ids.device) - 1]
        return self.proj(self.norm(eos))


class WorldClip(nn.Module):
    def __init__(self, config: WorldClipConfig) -> None:
        super().__init__()
        if not config.vocabulary:
            raise ValueError("WorldClip needs a vocabulary (see build_vocabulary)")
        self.config = config
        self.image_tower = ImageTower(config)
        self.text_tower = TextTower(config)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.init_temperature)))
        generator = torch.Generator().manual_seed(0)
        direction = torch.randn(config.embed_dim, generator=generator)
        self.register_buffer("gap_direction", F.normalize(direction, dim=0))
        # Fixed, never trained (and never saved: rebuilt from the seed) random projections
        # that give each modality its own component of the embedding.
        thumbnail = 3 * THUMBNAIL_SIDE**2
        for name, rows in (
            ("text_specific", len(config.vocabulary)),
            ("image_specific", thumbnail),
        ):
            weights = torch.randn(rows, config.embed_dim, generator=generator)
            self.register_buffer(name, weights, persistent=False)
        self.word_ids = {w: i for i, w in enumerate(config.vocabulary)}

    def _place(self, content: torch.Tensor, specific: torch.Tensor, sign: float) -> torch.Tensor:
        """Unit embeddings: content mixed with its modality's own component, orthogonal to
        the gap direction, tilted by gap / 2."""
        u = self.gap_direction.to(content.dtype)

        def unit_off_gap(x: torch.Tensor) -> torch.Tensor:
            return F.normalize(x - (x @ u)[:, None] * u, dim=-1)

        a = self.config.modality_specific
        content = unit_off_gap(content)
        if a > 0:
            content = unit_off_gap(math.sqrt(1.0 - a**2) * content + a * unit_off_gap(specific))
        tilt = self.config.gap / 2.0
        return math.sqrt(1.0 - tilt**2) * content + sign * tilt * u

    def _image_specific(self, pixels: torch.Tensor) -> torch.Tensor:
        thumb = F.adaptive_avg_pool2d(pixels, THUMBNAIL_SIDE).flatten(1)
        return (thumb - thumb.mean(1, keepdim=True)) @ self.image_specific.to(thumb.dtype)

    def _text_specific(self, ids: torch.Tensor) -> torch.Tensor:
        dtype = self.text_specific.dtype
        counts = torch.zeros(ids.shape[0], len(self.word_ids), dtype=dtype, device=ids.device)
        counts.scatter_add_(1, ids, torch.ones(ids.shape, dtype=dtype, device=ids.device))
        counts[:, [self.word_ids[t] for t in SPECIALS]] = 0  # padding and markers say nothing
        return counts @ self.text_specific

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_image_and_grid(pixels)[0]

    def encode_image_and_grid(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image embedding and the grid (:meth:`ImageTower.grid`) it is pooled from."""
        grid = self.image_tower.grid(pixels)
        embeds = self._place(self.image_tower.pool(grid), self._image_specific(pixels), 1.0)
        return embeds, grid

    def embed_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """Each grid token as the pool would embed an image that is that token alone
        (DenseCLIP's reading of an attention pool: positioned, value and output projections,
        then placed as image embeddings are, without the image-specific part)."""
        pool = self.image_tower.pool
        width = grid.shape[-1]
        weight, bias = pool.attention.in_proj_weight[2 * width :], pool.attention.in_proj_bias
        values = F.linear(grid + pool.position[1:], weight, bias[2 * width :])
        content = pool.proj(pool.attention.out_proj(values))
        flat = content.reshape(-1, content.shape[-1])
        placed = self._place(flat, torch.zeros_like(flat), 1.0)
        return placed.view(*content.shape[:-1], -1)

    def encode_text(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self._place(self.text_tower(ids, lengths), self._text_specific(ids), -1.0)

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded word ids ([N, longest]) with ``<bos>``/``<eos>``, and the lengths; texts
        longer than the context are cut, keeping their ``<eos>``."""
        unk, bos, eos = self.word_ids[UNK], self.word_ids[BOS], self.word_ids[EOS]
        keep = self.config.text_context - 2
        rows = [
            [bos, *[self.word_ids.get(w, unk) for w in split_words(t)][:keep], eos] for t in texts
        ]
        lengths = torch.tensor([len(r) for r in rows])
        ids = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
        return ids.to(self.logit_scale.device), lengths

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """RGB, resized to the model's size, in [0, 1], then normalized: [N, 3, S, S]."""
        size = self.config.image_size
        arrays = []
        for image in images:
            image = image.convert("RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            arrays.append(np.asarray(image, dtype=np.float32) / 255.0)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.logit_scale.device, self.logit_scale.dtype)


def save_world_clip(model: WorldClip, out_dir: str | Path, *, metrics: dict | None = None) -> None:
    """Write weights, then the config (with vocabulary and metrics), each file atomically;
    the config goes last, so a directory with a config always has matching weights."""
    out_dir = Path(out_dir)
    meta = {"format": FORMAT, "config": model.config.to_dict(), "metrics": metrics or {}}
    json.dumps(meta)  # fail before writing anything if `metrics` is not JSON-serializable
    with atomic_path(out_dir / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp))
    atomic_write_json(out_dir / CONFIG_NAME, meta)


def read_world_clip_meta(path: str | Path) -> dict:
    """The ``config.json`` of a checkpoint directory, checked to be a world CLIP's."""
    return read_json_config(Path(path) / CONFIG_NAME, FORMAT, "world CLIP")


def load_world_clip_model(path: str | Path) -> tuple[WorldClip, dict]:
    """The model (eval mode) of a checkpoint directory, and its recorded metrics."""
    path = Path(path)
    meta = read_world_clip_meta(path)
    try:
        config = WorldClipConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(path / CONFIG_NAME, f"bad world CLIP config: {e}") from e
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise BadInputError(weights, "missing: not a world CLIP checkpoint")
    model = WorldClip(config)
    try:
        load_model(model, weights, strict=True)
    except RuntimeError as e:
        raise BadInputError(weights, f"weights do not match the config: {e}") from e
    return model.eval(), meta.get("metrics", {})


# the world CLIPs shipped with pairfree: name -> folder under pairfree/assets
PACKAGED = {
    # 700 steps of batch 128 on the default, shifted and novel worlds (the tests' CLIP)
    "builtin": "world_clip",
    # 700 steps of batch 256 on those and the cluttered coco world (world v2's tables)
    "v2": "world_clip_v2",
}


def builtin_checkpoint(name: str = "builtin") -> Path:
    """A world CLIP shipped with pairfree (see ``PACKAGED``)."""
    return Path(str(resources.files("pairfree") / "assets" / PACKAGED[name]))


class WorldClipEncoder(BatchedClipEncoder):
    """A frozen :class:`WorldClip` behind the ClipEncoder protocol.

    Embeddings come out unit-length whether or not ``normalize`` is asked for: the gap
    construction places them on the sphere. Grid features are the image tower's last
    feature map before positional embeddings, ``[N, H*W, C]``.
    """

    def __init__(self, model: WorldClip, *, name: str) -> None:
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.embed_dim: int = model.config.embed_dim
        self.grid_shape = (model.config.grid_side**2, model.config.channels[-1])

    def _image_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.encode_image(self.model.pixels(images))

    def _text_batch(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(*self.model.tokenize(texts))

    def _grid_batch(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.model.image_tower.grid(self.model.pixels(images))

    def _image_and_grid_batch(
        self, images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode_image_and_grid(self.model.pixels(images))

    def _embed_grid_batch(self, grid: torch.Tensor) -> torch.Tensor:
        return self.model.embed_grid(grid)

    def vision_tower(self, image_size: int | None = None) -> WorldVisionTower:
        config = self.model.config
        tower_resolution(self.name, config.image_size, image_size, patch=None)
        spec = PixelSpec(config.image_size, config.image_mean, config.image_std)
        features = copy.deepcopy(self.model.image_tower.features)
        return WorldVisionTower(features, spec, self.grid_shape)


class WorldVisionTower(VisionTower):
    """The world CLIP's CNN image tower up to its last feature map (without the attention
    pool, which the grid does not pass through), giving that map's tokens."""

    def __init__(self, features: nn.Module, pixels: PixelSpec, grid_shape: tuple[int, int]):
        super().__init__()
        self.features = features.requires_grad_(True).train()
        self.pixels, self.grid_shape = pixels, grid_shape

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return feature_tokens(self.features, pixels)


def load_world_clip(
    model: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> WorldClipEncoder:
    """Load a world CLIP checkpoint directory, or a shipped one by name (``"builtin"``,
    ``"v2"``)."""
    path = builtin_checkpoint(model) if model in PACKAGED else Path(model)
    if not path.is_dir():
        raise PairfreeError(
            f"world CLIP {model!r}: neither a shipped one ({', '.join(PACKAGED)}) nor a folder "
            "made by `pairfree world train-clip`"
        )
    clip, _ = load_world_clip_model(path)
    # The name keys cached feature stores: a retrained checkpoint at the same path must not
    # reuse embeddings of the old one, so the name carries a fingerprint of the weights.
    fingerprint = hashlib.sha256((path / WEIGHTS_NAME).read_bytes()).hexdigest()[:10]
    name = f"world:{model}#{fingerprint}"
    return WorldClipEncoder(clip.to(device=device, dtype=dtype), name=name)
