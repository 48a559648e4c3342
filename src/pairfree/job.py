"""The one object a batch job carries through its stages: which process it is among how many,
what it skipped, and whether it shows progress.

Every stage (encoding, aggregation, training data preparation) takes a :class:`Job` instead of
loose rank / world-size / barrier / skip-log / progress arguments, so the same code runs as one
process or under ``accelerate launch``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
from accelerate import PartialState

from pairfree.errors import PairfreeError, SkipLog

logger = logging.getLogger(__name__)


def use_cpu(requested: bool) -> bool:
    """Whether to run on the CPU: when asked, and in a multi-process launch on a machine
    without CUDA, where accelerate would otherwise start every process as a lone rank 0 (all
    writing the same files) instead of joining them over gloo."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return requested or (launched and not torch.cuda.is_available())


def resolve_device(name: str | torch.device = "auto") -> str:
    """A torch device name: ``"auto"`` is the GPU when there is one (CUDA, else Apple's MPS),
    else the CPU; a named device is checked to exist here."""
    name = str(name)
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "mps" if mps is not None and mps.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise PairfreeError(f"unknown device {name!r} (auto, cpu, cuda, cuda:1, mps)") from err
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= max(count, 1) or count == 0:
            raise PairfreeError(f"device {name!r} asked for, but this machine has {count} CUDA "
                                "device(s); use --device cpu or auto")  # fmt: skip
    return name


@dataclass
class Job:
    """Processes (accelerate's :class:`PartialState`), the skip log and the progress switch."""

    state: PartialState = field(default_factory=PartialState)
    skip_log: SkipLog = field(default_factory=SkipLog)
    progress: bool = True

    @classmethod
    def create(cls, *, cpu: bool = False, strict: bool = False, progress: bool = True) -> Job:
        return cls(PartialState(cpu=use_cpu(cpu)), SkipLog(strict=strict), progress)

    @property
    def process_index(self) -> int:
        return self.state.process_index

    @property
    def num_processes(self) -> int:
        return self.state.num_processes

    @property
    def is_main_process(self) -> bool:
        return self.state.is_main_process

    @property
    def show_progress(self) -> bool:
        """Progress bars are drawn by the main process only."""
        return self.progress and self.is_main_process

    def wait_for_everyone(self) -> None:
        self.state.wait_for_everyone()

    def log_skips(self) -> None:
        """Report what was skipped so far (once, from the main process)."""
        if self.skip_log and self.is_main_process:
            logger.warning(self.skip_log.summary())
