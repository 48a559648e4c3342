"""Open backend registries: a backend or recipe added by another package's entry point, or by
a program's register_* call, without touching the library; the world's backends are
entry points of this package."""

from __future__ import annotations

import json
import textwrap

import pytest

from pairfree.backends import BackendRegistry
from pairfree.cli import main
from pairfree.clip import clip_backends, load_clip, register_clip_backend
from pairfree.errors import PairfreeError

PLUGIN = '''
from dataclasses import dataclass

from pairfree.clip import load_clip
from pairfree.recipes import register_recipe

CALLS = []


def load_clip_backend(model, *, device, dtype):
    CALLS.append(model)
    encoder = load_clip("world:builtin", device=device, dtype=dtype)
    encoder.name = "plugin:" + model
    return encoder


def load_llm(model, **options):
    return ("llm", model, options)


def load_text_to_image(model, settings, *, device):
    return ("text-to-image", model, device)


@dataclass
class PluginConfig:
    steps: int = 3


@register_recipe("plugin-recipe", PluginConfig)
def train(cfg, *, resume=True, progress=True):
    """A recipe another package ships."""
    return cfg.steps
'''

ENTRY_POINTS = """
[pairfree.clip]
plugin = pairfree_test_plugin:load_clip_backend
broken = pairfree_test_plugin_missing:load

[pairfree.llm]
plugin = pairfree_test_plugin:load_llm

[pairfree.text_to_image]
plugin = pairfree_test_plugin:load_text_to_image

[pairfree.recipes]
plugin-recipe = pairfree_test_plugin
"""


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """An installed package (a module and its dist-info) that declares pairfree entry points."""
    (tmp_path / "pairfree_test_plugin.py").write_text(PLUGIN)
    info = tmp_path / "pairfree_test_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: pairfree-test-plugin\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("pairfree_test_plugin")


def test_an_installed_packages_backends_and_recipe_are_found_by_name(plugin, tmp_path, capsys):
    from pairfree.recipes import get_recipe, recipe_names
    from pairfree.synth.llm import load_llm
    from pairfree.synth.text_to_image import load_text_to_image

    assert "plugin" in clip_backends() and "world" in clip_backends()
    encoder = load_clip("plugin:tiny")
    assert encoder.name == "plugin:tiny" and plugin.CALLS == ["tiny"]
    assert load_llm("plugin:small", temperature=0.5) == ("llm", "small", {"temperature": 0.5})
    assert load_text_to_image("plugin:sd")[:2] == ("text-to-image", "sd")
    assert "plugin-recipe" in recipe_names()
    recipe = get_recipe("plugin-recipe")
    assert (
        recipe.summary == "A recipe another package ships."
        and recipe.train(recipe.build_config()) == 3
    )

    # through the command line, as a user names it
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a red circle\na blue square\n")
    out = tmp_path / "features"
    assert (
        main(["encode", "--captions", str(corpus), "--clip", "plugin:cli", "--out", str(out)]) == 0
    )
    assert json.loads((out / "manifest.json").read_text())["encoder"] == "plugin:cli"
    assert main(["train", "plugin-recipe", "steps=5", "--print-config"]) == 0
    assert "steps: 5" in capsys.readouterr().out


def test_a_plugin_that_fails_to_import_is_named(plugin):
    with pytest.raises(
        PairfreeError, match=r"CLIP backend 'broken' \(pairfree_test_plugin_missing:load"
    ):
        load_clip("broken:x")


def test_a_program_registers_a_backend_and_cannot_shadow_one_by_accident(monkeypatch):
    from pairfree.clip import registry

    monkeypatch.setattr(registry, "CLIP_BACKENDS", BackendRegistry("CLIP", "pairfree.clip", {}))
    registry.CLIP_BACKENDS._builtin.update(hf="pairfree.clip.hf:load_hf_clip")
    made = []
    register_clip_backend("mine", lambda model, **kw: made.append((model, kw)) or "encoder")
    assert load_clip("mine:abc") == "encoder" and made == [
        ("abc", {"device": "cpu", "dtype": made[0][1]["dtype"]})
    ]
    for taken in ("mine", "hf", "world"):  # registered, built in, an entry point
        with pytest.raises(PairfreeError, match="exists; pass replace=True"):
            register_clip_backend(taken, lambda model, **kw: None)
    register_clip_backend("hf", lambda model, **kw: "replaced", replace=True)
    assert load_clip("hf:anything") == "replaced"
    for bad in ("", "a:b", " pad"):
        with pytest.raises(PairfreeError, match="non-empty name without ':'"):
            register_clip_backend(bad, lambda model, **kw: None)
    with pytest.raises(PairfreeError, match="unknown CLIP spec 'nope:x'.*'mine'"):
        load_clip("nope:x")


def test_the_library_core_never_names_the_world():
    """The world's backends reach the registries only as this package's entry points."""
    from pathlib import Path

    import pairfree

    root = Path(pairfree.__file__).parent
    apps = ("cli.py", "commands", "demo", "world")
    naming = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if not str(path.relative_to(root)).startswith(apps)
        and "pairfree.world" in path.read_text(encoding="utf-8")
    ]
    assert naming == []
    assert load_clip("world:builtin").name.startswith("world:builtin#")
