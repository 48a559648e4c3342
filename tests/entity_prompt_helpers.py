"""What ViECap's and IFCap's recipe tests share: a four-word corpus and its vocabulary, the
tiny-model overrides, and the training command line."""

import os
import subprocess
import sys
from pathlib import Path

WORDS = ["dog", "cat", "bus", "box"]


def write_entity_data(root: Path) -> Path:
    """corpus.txt ("a dog next to a cat", every ordered pair) and vocabulary.txt."""
    lines = [f"a {a} next to a {b}" for a in WORDS for b in WORDS if a != b]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    (root / "vocabulary.txt").write_text("\n".join(WORDS) + "\n")
    return root


def tiny_args(data: Path, clip_dir, gpt2_dir, out: Path, **extra) -> list[str]:
    """``key=value`` overrides for a recipe run on the tiny models (``extra`` wins)."""
    base = {
        "corpus.path": data / "corpus.txt",
        "corpus.val_fraction": 0.0,
        "entities.vocabulary": data / "vocabulary.txt",
        "entities.threshold": 0.0,
        "clip": f"hf:{clip_dir}",
        "features": out.parent / "features",
        "model.lm": gpt2_dir,
        "model.prefix_length": 3,
        "model.clip_length": 3,
        "model.mapper_layers": 1,
        "train.output_dir": out,
        "train.batch_size": 6,
        "train.warmup_steps": 2,
        "train.lr": 3e-3,
        "train.max_steps": 30,
        "generation.max_new_tokens": 12,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_cli(recipe: str):
    """A ``run_cli(args, **popen_options)`` that starts ``pairfree train <recipe>``."""

    def run_cli(args, **kw):
        return subprocess.Popen(
            [sys.executable, "-m", "pairfree.cli", "train", recipe, "--no-progress", *args],
            env=dict(os.environ, HF_HUB_OFFLINE="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            **kw,
        )

    return run_cli


def caption_with_cli(checkpoint: Path, image, folder: Path) -> list[str]:
    """``pairfree caption CHECKPOINT`` on ``image`` (a PIL image saved into ``folder``): the
    captions it writes."""
    import json

    image.save(folder / "red.png")
    out = folder / "captions.json"
    cli = [sys.executable, "-m", "pairfree.cli", "caption", str(checkpoint),
           str(folder / "red.png"), "--out", str(out), "-q"]  # fmt: skip
    done = subprocess.run(cli, env=dict(os.environ, HF_HUB_OFFLINE="1"), capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return [r["caption"] for r in json.loads(out.read_text())]
