"""The recipes, one module each, and the registry they add themselves to.

A recipe is the module ``pairfree.recipes.<name>`` (``-`` in the name written ``_``) whose
train function is decorated with :func:`register_recipe`, or a module another package declares
as a ``pairfree.recipes`` entry point (``name = "package.module"``) that does the same. The CLI,
experiments, the demo and the benchmarks find recipes here, by name; a recipe module never
imports another recipe.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pairfree.errors import PairfreeError

TrainFn = Callable[..., Any]


@dataclass(frozen=True)
class Recipe:
    name: str
    config_class: type
    train: TrainFn  # train(config, *, resume=True, progress=True) -> TrainResult
    summary: str  # the first line of the train function's docstring

    def build_config(self, data: dict | None = None, overrides: tuple[str, ...] | list[str] = ()):
        """This recipe's paper defaults <- ``data`` (a YAML file's) <- ``key.path=value``."""
        from pairfree.config import build_config

        return build_config(self.config_class, data, overrides)


_REGISTRY: dict[str, Recipe] = {}


def register_recipe(name: str, config_class: type) -> Callable[[TrainFn], TrainFn]:
    """Decorate a recipe module's train function to make it ``pairfree train <name>``."""

    def register(train: TrainFn) -> TrainFn:
        summary = (train.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Recipe(name, config_class, train, summary)
        return train

    return register


def _builtin_names() -> list[str]:
    return [m.name.replace("_", "-") for m in pkgutil.iter_modules(__path__)]


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group="pairfree.recipes")}


def recipe_names() -> list[str]:
    """Every recipe's name: this package's modules and installed packages' entry points (none
    is imported)."""
    return sorted({*_builtin_names(), *_entry_points()})


def get_recipe(name: str) -> Recipe:
    """Import recipe ``name``'s module (which registers it) and return it."""
    if name in _builtin_names():
        module = f"{__name__}.{name.replace('-', '_')}"
        importlib.import_module(module)
    elif (entry := _entry_points().get(name)) is not None:
        module = entry.value
        try:
            entry.load()
        except Exception as err:  # a third-party package's import error, named
            raise PairfreeError(f"recipe {name!r} ({module}) failed to load: {err}") from err
    else:
        raise PairfreeError(f"unknown recipe {name!r}; known: {', '.join(recipe_names())}")
    if name not in _REGISTRY:
        raise PairfreeError(f"module {module} does not register a recipe {name!r}")
    return _REGISTRY[name]
