"""Text-to-image backends behind one small protocol, chosen by name like the CLIP backends.

- ``diffusers:<hub id or local dir>``: Stable Diffusion through diffusers (SaCap: SD 1.5, its
  default scheduler, 20 steps; ICSD: SD 1.4, DPM-Solver, 20 steps, 512x512), with guidance
  scale, negative prompt, scheduler by name and fp16/bf16 on a GPU. The pipeline's own safety
  checker verdict is kept per image.
- ``world:<preset>``: the shapes world's synthetic-style renderer (the testbed's stand-in).

Every image's seed is :func:`image_seed` of (run seed, prompt, variant), so an image depends on
neither the batch it was made in, nor the number of processes, nor where a run resumed.
An all-black image counts as NSFW too: that is what Stable Diffusion's safety checker returns
in place of a flagged image, and what ICSD's code filters on (every channel of every pixel 0).
Whether flagged images are used is the dataset's choice (``keep_nsfw``,
:mod:`pairfree.synth.images`).

A backend's ``fingerprint`` keys a synthesis job beside its name (:mod:`pairfree.synth.shards`):
for diffusers, its models' weights (sampled, as CLIP encoders are fingerprinted) and its
scheduler's config; for the world, its settings and the images it draws for fixed probes.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from pairfree.backends import BackendRegistry, Factory
from pairfree.clip.batching import fingerprint
from pairfree.errors import PairfreeError, first_line, load_failure

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class GeneratedImage:
    image: Image.Image
    seed: int
    nsfw: bool  # flagged by the pipeline's safety checker, or all black
    mistakes: tuple[str, ...] | None = None  # departures from the prompt, when the backend knows


@runtime_checkable
class TextToImage(Protocol):
    name: str

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedImage]:
        """One image per prompt, each drawn from its own seed."""
        ...


def image_seed(run_seed: int, prompt: str, variant: int = 0) -> int:
    """A 63-bit seed fixed by (run seed, prompt, variant) alone."""
    key = f"{run_seed}\0{variant}\0{prompt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def is_black(image: Image.Image) -> bool:
    """Stable Diffusion's safety checker returns an all-black image for a flagged one."""
    return not np.asarray(image.convert("RGB")).any()


@dataclass
class DiffusionSettings:
    steps: int = 20
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    scheduler: str | None = None  # a diffusers scheduler class name; None: the pipeline's own
    height: int | None = None  # None: the pipeline's default
    width: int | None = None
    dtype: str = "float32"  # float16 / bfloat16 on a GPU

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise PairfreeError(f"steps must be at least 1, not {self.steps}")
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 0:
            raise PairfreeError(f"guidance_scale must be 0 or more, not {self.guidance_scale}")
        for side in ("height", "width"):
            if getattr(self, side) is not None and getattr(self, side) < 1:
                raise PairfreeError(f"{side} must be at least 1 pixel, not {getattr(self, side)}")
        if self.dtype not in DTYPES:
            raise PairfreeError(f"dtype must be one of {sorted(DTYPES)}, not {self.dtype!r}")


def pipeline_fingerprint(pipeline) -> str:
    """A short digest of a diffusers pipeline: each model's weights (sampled, as CLIP
    encoders are fingerprinted), its scheduler's class and config, its other parts' classes;
    so synthesis shards made by other weights behind the same name are never reused."""
    digest = hashlib.sha256()
    for part, component in sorted(pipeline.components.items()):
        if isinstance(component, torch.nn.Module):
            what = fingerprint(component, type(component).__name__)
        elif hasattr(component, "config"):  # a scheduler
            config = {k: v for k, v in dict(component.config).items() if not k.startswith("_")}
            what = type(component).__name__ + json.dumps(config, sort_keys=True, default=str)
        else:  # a tokenizer, a feature extractor, or None
            what = type(component).__name__ + str(len(component) if hasattr(component, "__len__")
                                                  else "")  # fmt: skip
        digest.update(f"{part}\0{what}\0".encode())
    return digest.hexdigest()[:10]


class DiffusersTextToImage:
    """A diffusers text-to-image pipeline (Stable Diffusion and compatible)."""

    def __init__(self, pipeline, settings: DiffusionSettings, *, name: str) -> None:
        self.pipeline = pipeline
        self.settings = settings
        self.name = name
        self.fingerprint = pipeline_fingerprint(pipeline)  # what a resumed job must match
        pipeline.set_progress_bar_config(disable=True)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int]) -> list[GeneratedImage]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        s = self.settings
        device = self.pipeline.device
        generators = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
        negative = [s.negative_prompt] * len(prompts) if s.negative_prompt else None
        try:
            out = self.pipeline(
                list(prompts),
                num_inference_steps=s.steps,
                guidance_scale=s.guidance_scale,
                negative_prompt=negative,
                height=s.height,
                width=s.width,
                generator=generators,
                output_type="pil",
            )
        except ValueError as err:  # settings the pipeline refuses (a size it cannot draw...)
            raise PairfreeError(f"{self.name}: {first_line(err)}") from None
        flags = getattr(out, "nsfw_content_detected", None) or [False] * len(prompts)
        return [
            GeneratedImage(image, seed, bool(flag) or is_black(image))
            for image, seed, flag in zip(out.images, seeds, flags, strict=True)
        ]


def load_diffusers(
    model: str, settings: DiffusionSettings, *, device: str | torch.device = "cpu"
) -> DiffusersTextToImage:
    """``DiffusionPipeline.from_pretrained(model)``, with the scheduler swapped if asked."""
    try:
        import diffusers
    except ImportError as err:
        raise PairfreeError(
            "the diffusers backend needs the synthesis extra: pip install 'pairfree[synthesis]'"
        ) from err
    try:
        pipeline = diffusers.DiffusionPipeline.from_pretrained(
            model, torch_dtype=DTYPES[settings.dtype]
        )
    except (OSError, ValueError) as err:
        raise load_failure(f"the text-to-image model {model!r}", model, err) from err
    if settings.scheduler:
        scheduler_class = getattr(diffusers, settings.scheduler, None)
        if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
            raise PairfreeError(f"unknown diffusers scheduler {settings.scheduler!r}")
        pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)
    return DiffusersTextToImage(pipeline.to(device), settings, name=f"diffusers:{model}")


# each factory takes (model, settings, *, device) and returns a TextToImage; the world's
# renderer (world:) is an entry point of the package (group pairfree.text_to_image)
TEXT_TO_IMAGE_BACKENDS = BackendRegistry(
    "text-to-image",
    "pairfree.text_to_image",
    {"diffusers": "pairfree.synth.text_to_image:load_diffusers"},
)


def register_text_to_image_backend(prefix: str, factory: Factory, *, replace: bool = False) -> None:
    """Make ``--backend <prefix>:<model>`` call ``factory(model, settings, device=...)``,
    which returns a :class:`TextToImage`."""
    TEXT_TO_IMAGE_BACKENDS.register(prefix, factory, replace=replace)


def load_text_to_image(
    spec: str,
    settings: DiffusionSettings | None = None,
    *,
    device: str | torch.device = "cpu",
) -> TextToImage:
    """The backend named by ``spec`` (``diffusers:<model>``, ``world:<preset>``, or a
    registered or installed backend's)."""
    factory, model = TEXT_TO_IMAGE_BACKENDS.resolve(spec)
    return factory(model, settings or DiffusionSettings(), device=device)
