"""pairfree: train image captioners without human-paired image-caption data.

The public API, imported on first use so that ``import pairfree`` stays light::

    from pairfree import Captioner, get_recipe, run_experiment

    captioner = Captioner.from_pretrained("runs/capdec-coco/best")
    recipe = get_recipe("capdec")
    config = recipe.build_config({"corpus": {"path": "corpus.txt"}}, ["train.lr=1e-5"])
    result = recipe.train(config)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Captioner": "pairfree.pipeline",
    "caption_files": "pairfree.captioning",
    "CheckpointCard": "pairfree.captioner",
    "Conditioning": "pairfree.captioner",
    "GenerationConfig": "pairfree.captioner",
    "build_config": "pairfree.config",
    "read_yaml": "pairfree.config",
    "get_recipe": "pairfree.recipes",
    "recipe_names": "pairfree.recipes",
    "run_experiment": "pairfree.experiment",
    "evaluate": "pairfree.evaluate",
    "CapDecConfig": "pairfree.recipes.capdec",
    "train_capdec": "pairfree.recipes.capdec",
    "CgtGanConfig": "pairfree.recipes.cgtgan",
    "train_cgtgan": "pairfree.recipes.cgtgan",
    "ICSDConfig": "pairfree.recipes.icsd",
    "train_icsd": "pairfree.recipes.icsd",
    "SaCapConfig": "pairfree.recipes.sacap",
    "train_sacap": "pairfree.recipes.sacap",
    "ScstGanConfig": "pairfree.recipes.scst_gan",
    "train_scst_gan": "pairfree.recipes.scst_gan",
    "ViECapConfig": "pairfree.recipes.viecap",
    "train_viecap": "pairfree.recipes.viecap",
    "IFCapConfig": "pairfree.recipes.ifcap",
    "train_ifcap": "pairfree.recipes.ifcap",
    "PCMNetConfig": "pairfree.recipes.pcmnet",
    "train_pcmnet": "pairfree.recipes.pcmnet",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pairfree' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(__all__)
