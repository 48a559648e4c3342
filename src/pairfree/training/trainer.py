"""The one training loop every recipe runs on.

A recipe hands the trainer its modules, its data and a ``step`` function that computes losses
and calls ``ctx.optimize(name, loss)`` for each optimizer it owns (one for CapDec, two for the
GANs). The trainer owns everything else, once: Hugging Face ``accelerate`` (one process or
many, DDP, mixed precision, gradient accumulation), the deterministic data order, warm-up
schedules, gradient clipping, validation, best/last artifacts (and, with
``keep_epochs``, every epoch's), JSONL metrics, a progress bar,
a log line every ``log_every`` steps (loss, learning rate, steps/s, time left) and after each
validation, TensorBoard / W&B through accelerate's trackers (``report_to``), and exact resume
from a checkpoint (weights, optimizers, schedulers, every RNG, data position).

Resume checkpoints are written by us as safetensors (weights) plus ``torch.save`` files of
plain tensors and numbers that are read back with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import gather_object, set_seed
from safetensors.torch import load_model, save_model
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from pairfree.errors import PairfreeError
from pairfree.io import atomic_write_json, strict_json
from pairfree.job import use_cpu

logger = logging.getLogger(__name__)
SCHEDULES = ("linear", "constant", "cosine", "noam")
CLIP_MODES = ("norm", "value")
PRECISIONS = ("no", "fp16", "bf16")
MODES = ("min", "max")


@dataclass
class TrainConfig:
    """Loop settings shared by every recipe (a recipe sets its paper's defaults)."""

    output_dir: str = "runs/experiment"
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    # the batch, given one way or the other (setting one clears the other; giving both at once
    # is an error): ``batch_size`` is global, the examples of one optimizer step across every
    # process and accumulation step; ``per_device_batch_size`` is one process' examples per
    # forward pass, so the global batch is it x processes x grad_accum (the originals' "batch
    # size per GPU")
    batch_size: int | None = field(default=40, metadata={"alternative": "per_device_batch_size"})
    per_device_batch_size: int | None = field(default=None, metadata={"alternative": "batch_size"})
    grad_accum: int = 1
    lr: float = 2e-5
    weight_decay: float = 0.0
    # parameters whose names contain one of these get no weight decay: CgT-GAN's groups (GPT-2
    # names its norms ln_*, so, as there, only its biases are spared there); SaCap's and ICSD's
    # code decay every parameter (their recipes set []), CapDec's none (weight decay 0)
    no_decay: list[str] = field(default_factory=lambda: ["bias", "LayerNorm.weight"])
    warmup_steps: int = 5000
    # after the warm-up: "linear" decays to 0, "cosine" along a half cosine to 0, "constant" not,
    # "noam" as 1/sqrt(step) (the Transformer's, whose warm-up rises linearly to lr too)
    schedule: str = "linear"
    grad_clip: float | None = None
    grad_clip_mode: str = "norm"  # "norm": the gradients' global norm; "value": each entry
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    seed: int = 0
    checkpoint_every: int = 1000  # optimizer steps between resumable checkpoints
    keep_checkpoints: int = 2
    log_every: int = 50
    eval_every: int | None = None  # optimizer steps between evaluations; None: each epoch
    select_metric: str = "val_loss"  # metric that picks the best artifact
    select_mode: str = "min"  # "min" | "max"
    keep_epochs: bool = False  # also write each finished epoch's artifact, as epoch-001/, ...
    num_workers: int = 0
    cpu: bool = False
    # experiment trackers, through accelerate: "tensorboard" (written to <output_dir>/logs),
    # "wandb", ... or "all" installed ones; [] for none (metrics.jsonl is always written)
    report_to: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if (self.batch_size is None) == (self.per_device_batch_size is None):
            raise ValueError(
                "give the batch one way: batch_size (global, per optimizer step) or "
                "per_device_batch_size (per process and forward pass), "
                + ("not both" if self.batch_size is not None else "neither is set")
            )
        at_least_one = ["epochs", "grad_accum", "checkpoint_every", "keep_checkpoints",
                        "log_every"]  # fmt: skip
        optional = ["max_steps", "eval_every", "batch_size", "per_device_batch_size"]
        for name in at_least_one + optional:
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, not {value}")
        for name in ("weight_decay", "warmup_steps", "num_workers"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, not {self.lr}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or null for none), not {self.grad_clip}")
        choices = {"schedule": SCHEDULES, "mixed_precision": PRECISIONS, "select_mode": MODES,
                   "grad_clip_mode": CLIP_MODES}  # fmt: skip
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, not {getattr(self, name)!r}")


@dataclass
class OptimizerSpec:
    """An AdamW over the trainable parameters of module ``name``, with its own schedule."""

    name: str
    lr: float | None = None  # None: TrainConfig.lr
    warmup_steps: int | None = None  # None: TrainConfig.warmup_steps
    # parameters whose names start with a key learn at its value instead (same schedule)
    lr_by_prefix: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainResult:
    global_step: int
    best_metric: float | None
    best_dir: Path | None
    last_dir: Path
    history: list[dict] = field(default_factory=list)


class EpochSampler(Sampler[int]):
    """A random permutation fixed by (seed, epoch), identical on every process."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def parameter_groups(
    named: Sequence[tuple[str, nn.Parameter]],
    weight_decay: float,
    no_decay: Sequence[str],
    lr_by_prefix: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on every parameter but those named like ``no_decay``; the
    parameters under a prefix of ``lr_by_prefix`` in groups of their own learning rate."""
    groups = []
    prefixes = [None, *(lr_by_prefix or {})]
    for prefix in prefixes:
        mine = [(n, p) for n, p in named
                if next((k for k in prefixes[1:] if n.startswith(k)), None) == prefix]  # fmt: skip
        extra = {} if prefix is None else {"lr": lr_by_prefix[prefix]}
        spared = [p for n, p in mine if any(key in n for key in no_decay)]
        decayed = [p for n, p in mine if not any(key in n for key in no_decay)]
        groups.append({"params": decayed, "weight_decay": weight_decay, **extra})
        if spared:
            groups.append({"params": spared, "weight_decay": 0.0, **extra})
    return groups


def global_batch(config: TrainConfig, processes: int) -> int:
    """The examples of one optimizer step, across processes and accumulation steps."""
    if config.per_device_batch_size is not None:
        return config.per_device_batch_size * processes * config.grad_accum
    batch = config.batch_size
    if batch % (config.grad_accum * processes):
        raise PairfreeError(
            f"train.batch_size {batch} (global) must split evenly into grad_accum "
            f"{config.grad_accum} x {processes} processes (or give train.per_device_batch_size)"
        )
    return batch


def lr_lambda(warmup: int, total: int, schedule: str) -> Callable[[int], float]:
    if schedule not in SCHEDULES:
        raise PairfreeError(f"unknown schedule {schedule!r}: expected one of {SCHEDULES}")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        if schedule == "noam":  # lr * min(s^-0.5, s * w^-1.5) * sqrt(w), s = step + 1
            return math.sqrt(max(1, warmup) / (step + 1))
        if schedule == "constant":
            return 1.0
        left = max(0.0, (total - step) / max(1, total - warmup))
        return 0.5 * (1.0 - math.cos(math.pi * left)) if schedule == "cosine" else left

    return factor


class StepContext:
    """What a recipe's step function sees: the modules, and ``optimize`` to apply a loss."""

    def __init__(self, trainer: Trainer) -> None:
        self._t = trainer
        self.accelerator = trainer.accelerator
        self.modules: dict[str, nn.Module] = trainer.modules
        self.global_step = 0

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def unwrap(self, name: str) -> nn.Module:
        return self.accelerator.unwrap_model(self.modules[name])

    def optimize(self, name: str, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into optimizer ``name``'s module and step it when due."""
        t = self._t
        opt, sched = t.optimizers[name], t.schedulers[name]
        self.accelerator.backward(loss)
        if self.accelerator.sync_gradients and t.config.grad_clip:
            if t.config.grad_clip_mode == "value":
                self.accelerator.clip_grad_value_(t.opt_params[name], t.config.grad_clip)
            else:
                self.accelerator.clip_grad_norm_(t.opt_params[name], t.config.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)


StepFn = Callable[[StepContext, Any], Mapping[str, float | torch.Tensor]]
ValFn = Callable[[StepContext, Any], Mapping[str, torch.Tensor]]
EvalFn = Callable[[StepContext], Mapping[str, float]]
SaveFn = Callable[[Mapping[str, nn.Module], Path], None]


class Trainer:
    """Runs ``step`` over ``train_data`` for the configured epochs; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        modules: Mapping[str, nn.Module],
        optimizers: Sequence[OptimizerSpec],
        train_data: Dataset,
        step: StepFn,
        save_artifact: SaveFn,
        *,
        collate: Callable | None = None,
        val_data: Dataset | None = None,
        val_step: ValFn | None = None,
        evaluate: EvalFn | None = None,
        run_config: Mapping[str, Any] | None = None,  # the recipe's own settings, logged
        progress: bool = True,
    ) -> None:
        self.config = config
        self.out = Path(config.output_dir)
        self.step_fn, self.save_artifact = step, save_artifact
        self.val_step, self.evaluate_fn = val_step, evaluate
        self.run_config = dict(run_config or {})
        self.progress = progress
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.grad_accum,
            cpu=use_cpu(config.cpu),
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            log_with=trackers(config.report_to),
            project_dir=str(self.out / "logs"),
        )
        acc = self.accelerator
        self.global_batch = global_batch(config, acc.num_processes)
        micro = self.global_batch // config.grad_accum  # one forward pass, over all processes
        logger.info("batch: %d examples per optimizer step (%d per process x %d processes x %d "
                    "accumulation steps)", self.global_batch, micro // acc.num_processes,
                    acc.num_processes, config.grad_accum)  # fmt: skip
        set_seed(config.seed, device_specific=True)

        self.train_data = train_data  # told the epoch, if it draws per-epoch randomness
        self.sampler = EpochSampler(len(train_data), config.seed)
        loader = DataLoader(
            train_data,
            batch_size=micro,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=config.num_workers,
            drop_last=True,
            # its own generator: starting an epoch must not draw from the global RNG, or a
            # resumed run (which restores that RNG) would diverge from an uninterrupted one
            generator=torch.Generator().manual_seed(config.seed),
        )
        if len(loader) == 0:
            raise PairfreeError(
                f"{len(train_data)} training examples are fewer than one batch of {micro}"
            )
        self.steps_per_epoch = len(loader) // config.grad_accum
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs

        self.opt_params: dict[str, list[nn.Parameter]] = {}
        raw_opts, raw_scheds = {}, {}
        for s in optimizers:
            named = [(n, p) for n, p in modules[s.name].named_parameters() if p.requires_grad]
            self.opt_params[s.name] = [p for _, p in named]
            raw_opts[s.name] = torch.optim.AdamW(
                parameter_groups(named, config.weight_decay, config.no_decay, s.lr_by_prefix),
                lr=s.lr if s.lr is not None else config.lr,
            )
            warmup = s.warmup_steps if s.warmup_steps is not None else config.warmup_steps
            if warmup >= self.total_steps:
                logger.warning(
                    "%s: warm-up of %d steps >= the run's %d steps: the learning rate never "
                    "reaches its peak (set train.warmup_steps lower)",
                    s.name,
                    warmup,
                    self.total_steps,
                )
            raw_scheds[s.name] = torch.optim.lr_scheduler.LambdaLR(
                raw_opts[s.name], lr_lambda(warmup, self.total_steps, config.schedule)
            )

        names = list(modules)
        prepared = acc.prepare(*modules.values(), *raw_opts.values(), *raw_scheds.values(), loader)
        n_mod, n_opt = len(names), len(raw_opts)
        self.modules = dict(zip(names, prepared[:n_mod], strict=True))
        self.optimizers = dict(zip(raw_opts, prepared[n_mod : n_mod + n_opt], strict=True))
        self.schedulers = dict(zip(raw_scheds, prepared[n_mod + n_opt : -1], strict=True))
        self.loader = prepared[-1]
        if val_data is not None:
            val_loader = DataLoader(val_data, batch_size=micro, collate_fn=collate)
            self.val_loader = acc.prepare(val_loader)
        else:
            self.val_loader = None

        self.global_step = 0
        self.epoch = 0
        self.batches_done_in_epoch = 0
        self.best_metric: float | None = None
        self.last_eval_step = -1
        self.history: list[dict] = []

    # ---------------------------------------------------------------- checkpoints
    def _checkpoint_dirs(self) -> list[Path]:
        root = self.out / "checkpoints"
        if not root.exists():
            return []
        return sorted(p for p in root.glob("step-*") if not p.name.endswith(".tmp"))

    def save_checkpoint(self) -> Path:
        """Everything needed to continue exactly: weights, optimizers, schedulers, RNGs, position."""
        acc = self.accelerator
        final = self.out / "checkpoints" / f"step-{self.global_step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            for name, module in self.modules.items():
                save_model(acc.unwrap_model(module), str(tmp / f"{name}.safetensors"))
            for name, opt in self.optimizers.items():
                torch.save(
                    {
                        "optimizer": opt.state_dict(),
                        "scheduler": self.schedulers[name].state_dict(),
                    },
                    tmp / f"optim-{name}.pt",
                )
            atomic_write_json(
                tmp / "trainer_state.json",
                {
                    "global_step": self.global_step,
                    "epoch": self.epoch,
                    "batches_done_in_epoch": self.batches_done_in_epoch,
                    "best_metric": self.best_metric,
                    "num_processes": acc.num_processes,
                },
            )
        np_state = np.random.get_state()
        rng = {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_rest": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": list(random.getstate()[1]),
            "python_gauss": random.getstate()[2],
        }
        torch.save(rng, tmp / f"rng-{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self._checkpoint_dirs()[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> None:
        acc = self.accelerator
        state = json.loads((path / "trainer_state.json").read_text())
        if state["num_processes"] != acc.num_processes:
            raise PairfreeError(
                f"{path} was written by {state['num_processes']} processes; resume it with the "
                f"same number (now {acc.num_processes})"
            )
        for name, module in self.modules.items():
            load_model(acc.unwrap_model(module), str(path / f"{name}.safetensors"))
        for name, opt in self.optimizers.items():
            saved = torch.load(path / f"optim-{name}.pt", map_location="cpu", weights_only=True)
            opt.load_state_dict(saved["optimizer"])
            self.schedulers[name].load_state_dict(saved["scheduler"])
        rng = torch.load(path / f"rng-{acc.process_index}.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
        keys = rng["numpy_keys"].numpy().astype(np.uint32)
        np.random.set_state(("MT19937", keys, *rng["numpy_rest"]))
        random.setstate((3, tuple(rng["python"]), rng["python_gauss"]))
        self.global_step = state["global_step"]
        self.epoch = state["epoch"]
        self.batches_done_in_epoch = state["batches_done_in_epoch"]
        self.best_metric = state["best_metric"]

    # ---------------------------------------------------------------- evaluation
    def _validate(self, ctx: StepContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.val_loader is not None and self.val_step is not None:
            for module in self.modules.values():
                module.eval()
            sums: dict[str, float] = {}
            count = 0
            with torch.no_grad():
                for batch in self.val_loader:
                    values = self.val_step(ctx, batch)
                    gathered = {
                        k: self.accelerator.gather_for_metrics(v) for k, v in values.items()
                    }
                    for key, v in gathered.items():
                        sums[key] = sums.get(key, 0.0) + float(v.sum())
                    count += len(next(iter(gathered.values())))
            metrics.update({k: s / max(1, count) for k, s in sums.items()})
            for module in self.modules.values():
                module.train()
        if self.evaluate_fn is not None:
            metrics.update(self.evaluate_fn(ctx))
        return metrics

    def _is_better(self, value: float) -> bool:
        if self.best_metric is None:
            return True
        if self.config.select_mode == "max":
            return value > self.best_metric
        return value < self.best_metric

    def _write_artifact(self, name: str) -> Path:
        path = self.out / name
        if self.accelerator.is_main_process:
            unwrapped = {k: self.accelerator.unwrap_model(m) for k, m in self.modules.items()}
            tmp = path.with_name(path.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            self.save_artifact(unwrapped, tmp)
            shutil.rmtree(path, ignore_errors=True)
            tmp.rename(path)
        self.accelerator.wait_for_everyone()
        return path

    def _log(self, record: dict) -> None:
        self.history.append(record)
        if self.config.report_to:
            numbers = {k: float(v) for k, v in {**record, **record.get("eval", {})}.items()
                       if k not in ("step", "eval") and isinstance(v, int | float)}  # fmt: skip
            self.accelerator.log(numbers, step=record["step"])
        if self.accelerator.is_main_process:
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(strict_json(record)) + "\n")
            logger.info("%s", self._log_line(record))

    def _record_session(self, *, finished: bool = False) -> None:
        """``run.json``: how the run was started (command line, versions) and each session of
        it (a resumed run has several): start, end, wall time, steps."""
        if not self.accelerator.is_main_process:
            return
        path = self.out / "run.json"
        record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        sessions = record.setdefault("sessions", [])
        if not finished:
            sessions.append({"command": sys.argv, "versions": _versions(),
                             "processes": self.accelerator.num_processes,
                             "global_batch": self.global_batch,
                             "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "from_step": self.global_step})  # fmt: skip
        elif sessions:
            sessions[-1].update(to_step=self.global_step,
                                wall_s=round(time.time() - self.started, 1))  # fmt: skip
        atomic_write_json(path, record)

    def _log_line(self, record: dict) -> str:
        """``step 50/700 (7%) | loss 3.33 | lr 1.5e-03 | 1.8 steps/s | 6m12s left`` or
        ``step 175 validation | val_loss 1.05 | val_CIDEr 137.1``."""
        head = f"step {record['step']}/{self.total_steps}"
        if "eval" in record:
            cells = [f"{k} {_short(v)}" for k, v in record["eval"].items()]
            return " | ".join([f"{head} validation", *cells])
        cells = [f"{k} {_short(v)}" for k, v in record.items()
                 if k not in ("step", "epoch", "elapsed_s")]  # fmt: skip
        done = record["step"] - self.first_step
        seconds = time.time() - self.started
        if done > 0 and seconds > 0:
            rate = done / seconds
            left = (self.total_steps - record["step"]) / rate
            cells += [f"{rate:.3g} steps/s", f"{_duration(left)} left"]
        percent = 100 * record["step"] // max(1, self.total_steps)
        return " | ".join([f"{head} ({percent}%)", *cells])

    def _evaluate_and_select(self, ctx: StepContext) -> None:
        self.last_eval_step = self.global_step
        metrics = self._validate(ctx)
        if not metrics:
            return
        self._log({"step": self.global_step, "epoch": self.epoch, "eval": metrics})
        value = metrics.get(self.config.select_metric)
        if value is not None and math.isfinite(value) and self._is_better(value):
            self.best_metric = value
            self._write_artifact("best")

    # ---------------------------------------------------------------- the loop
    def _config_record(self) -> dict:
        return json.loads(json.dumps({"train": asdict(self.config), **self.run_config}))

    def _check_resumable(self, saved_config: Path) -> None:
        """Refuse to continue a run whose recipe or optimization settings have changed."""
        if not saved_config.exists():
            return
        saved, now = json.loads(saved_config.read_text()), self._config_record()
        free = {"epochs", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every",
                "eval_every", "num_workers", "output_dir", "report_to", "keep_epochs"}  # fmt: skip
        for record in (saved, now):
            for key in free:
                record["train"].pop(key, None)
        if saved != now:
            raise PairfreeError(
                f"{self.out} holds checkpoints of a run with a different config; use another "
                "train.output_dir, or --no-resume to start over there"
            )

    def fit(self, resume: bool = True) -> TrainResult:
        """Train to ``total_steps``; with ``resume`` continue from the newest checkpoint."""
        # log lines print above the progress bar instead of through it
        with logging_redirect_tqdm(loggers=[logging.getLogger("pairfree")]):
            return self._fit(resume)

    def _fit(self, resume: bool) -> TrainResult:
        acc, cfg = self.accelerator, self.config
        self.out.mkdir(parents=True, exist_ok=True)
        saved_config = self.out / "config.json"
        checkpoints = self._checkpoint_dirs()
        if checkpoints and resume:
            self._check_resumable(saved_config)
        if checkpoints and not resume and acc.is_main_process:
            shutil.rmtree(self.out / "checkpoints")
            (self.out / "metrics.jsonl").unlink(missing_ok=True)
        acc.wait_for_everyone()
        if acc.is_main_process:
            atomic_write_json(saved_config, self._config_record())
        if checkpoints and resume:
            self.load_checkpoint(checkpoints[-1])
            if acc.is_main_process:
                logger.info("resumed from %s (step %d)", checkpoints[-1], self.global_step)
        ctx = StepContext(self)
        for module in self.modules.values():
            module.train()
        if cfg.report_to:
            acc.init_trackers(self.out.name, config=_scalars(self._config_record()))
        self.started, self.first_step = time.time(), self.global_step
        self._record_session()
        bar = tqdm(
            total=self.total_steps,
            initial=self.global_step,
            desc="train",
            disable=not self.progress or not acc.is_main_process,
            unit="step",
        )
        running: dict[str, float] = {}
        n_running = 0
        while self.global_step < self.total_steps:
            loader = self.loader
            if self.batches_done_in_epoch >= len(self.loader):
                loader = []
            elif self.batches_done_in_epoch:
                loader = acc.skip_first_batches(self.loader, self.batches_done_in_epoch)
            if loader:
                # accelerate's loaders re-set the sampler's epoch from their own counter
                loader.set_epoch(self.epoch)
                if hasattr(self.train_data, "set_epoch"):  # e.g. seeded image augmentation
                    self.train_data.set_epoch(self.epoch)
            for batch in loader:
                ctx.global_step = self.global_step
                with acc.accumulate(*self.modules.values()):
                    logs = self.step_fn(ctx, batch)
                self.batches_done_in_epoch += 1
                for k, v in logs.items():
                    running[k] = running.get(k, 0.0) + float(v)
                n_running += 1
                if not acc.sync_gradients:
                    continue
                self.global_step += 1
                bar.update(1)
                if self.global_step % cfg.log_every == 0 or self.global_step == self.total_steps:
                    lr = self.schedulers[next(iter(self.schedulers))].get_last_lr()[0]
                    record = {k: v / n_running for k, v in running.items()}
                    record.update(step=self.global_step, epoch=self.epoch, lr=lr)
                    record["elapsed_s"] = round(time.time() - self.started, 2)
                    self._log(record)
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in logs})
                    running, n_running = {}, 0
                if cfg.eval_every and self.global_step % cfg.eval_every == 0:
                    self._evaluate_and_select(ctx)
                if self.global_step % cfg.checkpoint_every == 0:
                    self.save_checkpoint()
                if self.global_step >= self.total_steps:
                    break
            if self.batches_done_in_epoch >= len(self.loader):
                self.epoch += 1
                self.batches_done_in_epoch = 0
                if not cfg.eval_every:
                    self._evaluate_and_select(ctx)
                if cfg.keep_epochs:
                    self._write_artifact(f"epoch-{self.epoch:03d}")
        bar.close()
        if self.last_eval_step != self.global_step:
            self._evaluate_and_select(ctx)
        last = self._write_artifact("last")
        self._record_session(finished=True)
        if cfg.report_to:
            acc.end_training()
        if self.global_step % cfg.checkpoint_every:
            self.save_checkpoint()
        best = self.out / "best"
        return TrainResult(
            global_step=self.global_step,
            best_metric=self.best_metric,
            best_dir=best if best.exists() else None,
            last_dir=last,
            history=self.history,
        )


def captions_across_processes(
    accelerator: Accelerator, ids: Sequence[str], caption: Callable[[slice], list[str]]
) -> dict[str, str]:
    """Id -> caption for all ``ids``: each process captions its slice (``caption(mine)``
    returns the captions of ``ids[mine]``), every process gets them all (validation by
    caption metrics)."""
    mine = slice(accelerator.process_index, None, accelerator.num_processes)
    return dict(gather_object(list(zip(ids[mine], caption(mine), strict=True))))


def trackers(report_to: Sequence[str]) -> list[str] | str | None:
    """accelerate's ``log_with``: the named trackers, ``"all"`` of the installed ones, None."""
    if not report_to:
        return None
    return "all" if "all" in report_to else list(report_to)


def _scalars(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to the scalar values trackers record as hyperparameters."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            out.update(_scalars(value, f"{prefix}{key}."))
        elif isinstance(value, bool | int | float | str):
            out[prefix + key] = value
    return out


def _versions() -> dict[str, str]:
    import platform

    import accelerate
    import transformers

    from pairfree import __version__

    return {"pairfree": __version__, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}  # fmt: skip


def _short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
