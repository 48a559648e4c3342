"""Configs are plain (nested) dataclasses, read from YAML and overridden from the command line.

``build_config(CapDecConfig, read_yaml("configs/capdec/coco.yaml"), ["train.lr=1e-5"])``
builds the dataclass from its defaults, the file and the overrides, checks every key against
its fields (a typo is an error that lists the valid keys) and coerces values to the field
types. ``from_dict(..., complete=True)`` also requires every field (checkpoint cards).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from pairfree.errors import BadInputError, PairfreeError, first_line
from pairfree.io import read_user_text

C = TypeVar("C")


def _coerce(value: Any, hint: Any, where: str, complete: bool) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where, complete) if len(args) == 1 else value
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise PairfreeError(f"config {where}: expected a mapping, got {value!r}")
        return from_dict(hint, value, where=where, complete=complete)
    if origin in (list, tuple) and isinstance(value, Sequence) and not isinstance(value, str):
        (item,) = typing.get_args(hint)[:1] or (Any,)
        items = [_coerce(v, item, f"{where}[{i}]", complete) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if hint is int and isinstance(value, float):
        if not value.is_integer():
            raise PairfreeError(f"config {where}: {value!r} is not a whole number")
        return int(value)
    if hint in (int, float) and isinstance(value, bool):
        raise PairfreeError(f"config {where}: {value!r} is not a number")
    try:
        if hint is float and isinstance(value, (int, str)):
            return float(value)
        if hint is int and isinstance(value, str):
            return int(value)
        if hint is bool and isinstance(value, str):
            if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "yes", "1")
    except ValueError:
        raise PairfreeError(f"config {where}: {value!r} is not a valid {hint.__name__}") from None
    if hint in (int, float) and not isinstance(value, (int, float)):
        raise PairfreeError(f"config {where}: {value!r} is not a number")
    if hint is str and not isinstance(value, str):
        return str(value)
    return value


def from_dict(
    cls: type[C], data: Mapping[str, Any], *, where: str = "", complete: bool = False
) -> C:
    """Build dataclass ``cls`` from a mapping, recursing into nested dataclass fields.

    An unknown key is an error; with ``complete`` a missing one is too (no silent defaults).
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(data) - names)
    if unknown:
        raise PairfreeError(
            f"unknown config key {prefix}{unknown[0]}; valid keys here: {', '.join(sorted(names))}"
        )
    missing = sorted(names - set(data)) if complete else []
    if missing:
        raise PairfreeError(f"missing config key {prefix}{missing[0]}")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}{k}", complete) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, PairfreeError) as err:
        raise PairfreeError(f"config {where or cls.__name__}: {err}") from None


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set ``a.b.c=value`` entries (values parsed as YAML) in a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PairfreeError(f"override {item!r} is not of the form key.path=value")
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            if node.get(part) is None:  # a section that is off (null) until a key of it is set
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise PairfreeError(f"override {item!r}: {part} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw else ""
    return data


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file; what is wrong with it is one line naming the file (and the line)."""
    path = Path(path)
    if not path.exists():
        raise PairfreeError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(read_user_text(path)) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or first_line(err)
        line = None if mark is None else mark.line + 1
        raise BadInputError(path, f"not valid YAML: {problem}", line=line) from None
    if not isinstance(data, dict):
        raise PairfreeError(f"{path}: expected a mapping at the top level")
    return data


def _clear_alternatives(cls: type, base: dict[str, Any], layer: Mapping[str, Any], where: str):
    """Fields that say the same thing two ways (``metadata={"alternative": other}``, e.g. a
    global and a per-device batch): a layer that sets one clears the other in ``base``;
    setting both in one layer is an error."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name not in layer:
            continue
        hint = next((a for a in (hints[f.name], *typing.get_args(hints[f.name]))
                     if dataclasses.is_dataclass(a)), None)  # fmt: skip
        value = layer[f.name]
        if hint is not None and isinstance(value, Mapping) and isinstance(base.get(f.name), dict):
            _clear_alternatives(hint, base[f.name], value, f"{where}{f.name}.")
        other = f.metadata.get("alternative")
        if other is None or value is None:
            continue
        if layer.get(other) is not None:
            raise PairfreeError(f"config {where}{f.name} and {where}{other} say the same thing "
                                "two ways: give one of them")  # fmt: skip
        base[other] = None


def build_config(
    cls: type[C], data: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()
) -> C:
    """Defaults of ``cls`` <- ``data`` (e.g. a YAML file's) <- command-line overrides.

    ``cls()`` must be constructible: its defaults (a recipe's paper defaults, nested ones
    included) are the base that the data and the overrides update key by key (a key given
    replaces its alternative, see :func:`_clear_alternatives`).
    """
    merged = to_dict(cls())
    _clear_alternatives(cls, merged, data or {}, "")
    _deep_merge(merged, data or {})
    _clear_alternatives(cls, merged, apply_overrides({}, overrides), "")
    return from_dict(cls, apply_overrides(merged, overrides))
