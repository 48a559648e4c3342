"""The synthesis stages as ICSD, ``pairfree synthesize`` and the demo run them.

Each stage takes its config (an :class:`~pairfree.synth.llm.LLMConfig`, or an
:class:`ImageSynthesisConfig`), loads its model (on the job's device unless told another) and
writes a resumable, sharded output folder (:mod:`pairfree.synth.shards`), so the recipes, the
commands and the demo ask for the same work the same way and share each other's output. Grouping, the fourth stage, is
:func:`pairfree.synth.text.group_corpus`, which needs a CLIP rather than a generator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from pairfree.data import Caption
from pairfree.errors import PairfreeError
from pairfree.job import Job
from pairfree.synth.images import Prompt, SynthesisSummary, plan_prompts, synthesize_images
from pairfree.synth.llm import LLMConfig
from pairfree.synth.tasks import REPHRASE_PROMPT, SUMMARIZE_PROMPT, load_prompt
from pairfree.synth.text import Group, TextJobSummary, rephrase_captions, summarize_groups
from pairfree.synth.text_to_image import DiffusionSettings, load_text_to_image


@dataclass
class ImageSynthesisConfig(DiffusionSettings):
    """A text-to-image backend with its diffusion settings, the run seed (each image's seed
    follows from it, its prompt and its variant), and how the work is cut; what the
    ``synthesize images`` flags say, and ICSD's ``synthesis.images``."""

    backend: str = ""  # diffusers:<model or folder>, world:<preset>, or a registered one
    seed: int = 0
    variants: int = 1  # images per prompt
    batch_size: int = 8
    shard_size: int = 256  # prompts per shard (the unit of resume)
    keep_nsfw: bool = False  # images the safety checker flagged are pairs of the dataset too

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("variants", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise PairfreeError(f"{name} must be at least 1, not {getattr(self, name)}")

    def settings(self) -> DiffusionSettings:
        return DiffusionSettings(
            **{f.name: getattr(self, f.name) for f in fields(DiffusionSettings)}
        )


def draw_images(
    config: ImageSynthesisConfig,
    captions: Sequence[Caption],
    out: str | Path,
    *,
    job: Job,
    device: str | torch.device | None = None,
) -> tuple[list[Prompt], SynthesisSummary | None]:
    """``config.variants`` images of every caption into ``out``
    (:func:`~pairfree.synth.images.synthesize_images`); the prompts planned, in caption
    order, and the summary (None on processes other than the main one)."""
    settings = config.settings()
    where = job.state.device if device is None else device
    backend = load_text_to_image(config.backend, settings, device=where)
    prompts = plan_prompts(captions, variants=config.variants, seed=config.seed)
    summary = synthesize_images(
        backend,
        prompts,
        out,
        settings={**asdict(settings), "seed": config.seed, "variants": config.variants},
        batch_size=config.batch_size,
        shard_size=config.shard_size,
        keep_nsfw=config.keep_nsfw,
        job=job,
    )
    return prompts, summary


def summarize(
    config: LLMConfig,
    groups: Sequence[Group],
    out: str | Path,
    *,
    job: Job,
    shard_size: int = 512,
    device: str | torch.device | None = None,
) -> TextJobSummary | None:
    """ICSD's select-and-summarize of every group (:func:`~pairfree.synth.text.summarize_groups`)
    with ``config``'s LLM, prompt (ICSD's unless ``config.prompt`` names a file) and reading."""
    template = load_prompt(config.prompt, SUMMARIZE_PROMPT, "captions")
    return _ask(summarize_groups, config, template, groups, out, job=job, shard_size=shard_size,
                device=device)  # fmt: skip


def rephrase(
    config: LLMConfig,
    captions: Sequence[str],
    out: str | Path,
    *,
    job: Job,
    shard_size: int = 1024,
    device: str | torch.device | None = None,
) -> TextJobSummary | None:
    """SaCap's three rephrasings of every distinct caption
    (:func:`~pairfree.synth.text.rephrase_captions`) with ``config``'s LLM, prompt and reading."""
    template = load_prompt(config.prompt, REPHRASE_PROMPT, "caption")
    return _ask(rephrase_captions, config, template, captions, out, job=job,
                shard_size=shard_size, device=device)  # fmt: skip


def _ask(
    task: Callable[..., TextJobSummary | None],
    config: LLMConfig,
    template: str,
    inputs: Sequence,
    out: str | Path,
    *,
    job: Job,
    shard_size: int,
    device: str | torch.device | None,
) -> TextJobSummary | None:
    """Run an LLM ``task`` over ``inputs``, asked as ``config`` says (the template loaded
    first, so a bad prompt file fails before the model loads)."""
    llm = config.load(job.state.device if device is None else device)
    return task(llm, inputs, out, template=template, sampling=config.sampling(),
                batch_size=config.batch_size, shard_size=shard_size,
                strict=config.strict_answers, job=job)  # fmt: skip
