"""Backends chosen by name: ``"<backend>:<model>"`` specs resolved through a registry per kind.

Each kind of backend (CLIP, text-to-image, LLM) has a :class:`BackendRegistry` holding, by
prefix, the library's own backends (``"module:function"``, imported only when named, so
``import pairfree`` stays light), those a program registers (``register_clip_backend`` and
its siblings), and those installed packages declare as entry points in the kind's group
(``pairfree.clip``, ``pairfree.llm``, ``pairfree.text_to_image``). The shapes world's
backends are entry points of this package, so the library core never names its testbed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from typing import Any

from pairfree.errors import PairfreeError

Factory = Callable[..., Any]


class BackendRegistry:
    """The backends of one kind, by prefix: registered ones first, then the library's own,
    then installed packages' entry points (read when a prefix is not found elsewhere, so a
    package installed after import is seen)."""

    def __init__(self, kind: str, group: str, builtin: Mapping[str, str]) -> None:
        self.kind, self.group = kind, group
        self._builtin = dict(builtin)
        self._registered: dict[str, Factory] = {}

    def register(self, prefix: str, factory: Factory, *, replace: bool = False) -> None:
        """Make ``"<prefix>:<model>"`` specs call ``factory(model, ...)``; a prefix in use is
        refused unless ``replace``."""
        if not prefix or ":" in prefix or prefix != prefix.strip():
            raise PairfreeError(f"a {self.kind} backend prefix is a non-empty name without ':'")
        if not callable(factory):
            raise PairfreeError(f"the {self.kind} backend {prefix!r} needs a callable factory")
        if not replace and prefix in self.names():
            raise PairfreeError(
                f"the {self.kind} backend {prefix!r} exists; pass replace=True to override it"
            )
        self._registered[prefix] = factory

    def _entry_points(self) -> dict[str, importlib.metadata.EntryPoint]:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=self.group)}

    def names(self) -> list[str]:
        return sorted({*self._registered, *self._builtin, *self._entry_points()})

    def resolve(self, spec: str) -> tuple[Factory, str]:
        """(the factory of ``spec``'s backend, the model part of ``spec``)."""
        prefix, sep, model = spec.partition(":")
        if sep and prefix in self._registered:
            return self._registered[prefix], model
        if sep and prefix in self._builtin:
            module, _, function = self._builtin[prefix].partition(":")
            return getattr(importlib.import_module(module), function), model
        entry = self._entry_points().get(prefix) if sep else None
        if entry is None:
            raise PairfreeError(
                f"unknown {self.kind} spec {spec!r}: expected '<backend>:<model>' with backend "
                f"one of {self.names()}"
            )
        try:
            factory = entry.load()
        except Exception as err:  # a third-party package's import error, named
            raise PairfreeError(
                f"the {self.kind} backend {prefix!r} ({entry.value}, entry point of "
                f"{self.group}) failed to load: {err}"
            ) from err
        return factory, model
