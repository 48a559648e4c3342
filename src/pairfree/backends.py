"""Backends chosen by name: ``"<backend>:<model>"`` specs resolved through a small table.

Each kind of backend (CLIP, text-to-image, LLM) keeps its own table of
``prefix -> "module:function"``; the module is imported only when its backend is named, so
``import pairfree`` stays light and a testbed backend (the shapes world) is never imported by
the library unless asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from pairfree.errors import PairfreeError


def resolve_backend(
    spec: str, backends: Mapping[str, str], what: str
) -> tuple[Callable[..., Any], str]:
    """(the factory of ``spec``'s backend, the model part of ``spec``)."""
    prefix, sep, model = spec.partition(":")
    if not sep or prefix not in backends:
        raise PairfreeError(
            f"unknown {what} spec {spec!r}: expected '<backend>:<model>' with backend one of "
            f"{sorted(backends)}"
        )
    module, _, function = backends[prefix].partition(":")
    return getattr(importlib.import_module(module), function), model


class OnFirstUse:
    """A backend that is loaded when first asked for anything but its name: a resumed job
    whose work is all done never pays for loading a large model."""

    def __init__(self, name: str, load: Callable[[], Any]) -> None:
        self.name = name
        self._load, self._backend = load, None

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("_"):
            raise AttributeError(attribute)
        if self._backend is None:
            self._backend = self._load()
        return getattr(self._backend, attribute)
