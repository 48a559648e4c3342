"""The dependency rules of DESIGN.md §2, read off the source: recipes never import each other,
the library never imports the CLI, there is no import cycle, and the world is a testbed that
the library never imports (only the demo, the CLI and the world itself may)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[1] / "src" / "pairfree"


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every pairfree module ``path`` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pairfree"):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("pairfree"))
    return found


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}
GRAPH = {name: {m for m in imports_of(path) if m in MODULES} for name, path in MODULES.items()}


APPS = ("pairfree.cli", "pairfree.commands", "pairfree.demo", "pairfree.world")


def library(name: str) -> bool:
    """The library proper: not the CLI, the demo app or the world testbed."""
    return not any(name == app or name.startswith(app + ".") for app in APPS)


def test_a_recipe_never_imports_another_recipe():
    recipes = [m for m in MODULES if m.startswith("pairfree.recipes.")]
    assert {"pairfree.recipes.capdec", "pairfree.recipes.cgtgan"} <= set(recipes)
    for recipe in recipes:
        others = {m for m in GRAPH[recipe] if m in recipes and m != recipe}
        assert not others, f"{recipe} imports {others}"


def test_the_library_never_imports_the_cli_the_demo_or_the_world():
    for name, deps in GRAPH.items():
        if library(name) and name != "pairfree":
            bad = {d for d in deps if not library(d)}
            assert not bad, f"{name} imports {bad}"


def test_loading_a_checkpoint_imports_no_evaluation_code():
    """hub.py (from_pretrained, the model card) reads run folders through pairfree.runs."""
    assert not {d for d in GRAPH["pairfree.hub"] if d.startswith("pairfree.evaluate")}


def test_training_validates_without_the_inference_facade():
    """Training decodes through captioner.decoding, not pipeline.Captioner (load, save, share)
    and the hub code beneath it."""
    for name, deps in GRAPH.items():
        if name.startswith(("pairfree.training", "pairfree.recipes")):
            assert not deps & {"pairfree.pipeline", "pairfree.hub"}, f"{name} imports {deps}"


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in GRAPH[name]:
            if dep == name or dep.startswith(name + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(dep) == 1 and not name.startswith(dep + "."):
                pytest.fail("import cycle: " + " -> ".join([*path, name, dep]))
            if dep not in state:
                visit(dep, [*path, name])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])


def test_library_code_logs_instead_of_printing():
    for name, path in MODULES.items():
        if library(name):
            calls = [
                node
                for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
            ]
            assert not calls, f"{name} prints (line {calls[0].lineno}); use logging"


def test_top_level_api_is_lazy_and_complete():
    code = (
        "import sys, pairfree\n"
        "assert 'torch' not in sys.modules, 'import pairfree pulled in torch'\n"
        "from pairfree import Captioner, get_recipe, recipe_names, run_experiment\n"
        "assert Captioner.__module__ == 'pairfree.pipeline'\n"
        "assert recipe_names() == ['capdec', 'cgtgan', 'icsd', 'ifcap', 'pcmnet', 'sacap',"
        " 'scst-gan', 'viecap']\n"
        "assert [get_recipe(n).name for n in recipe_names()] == recipe_names()\n"
        "import pairfree.recipes.capdec as m\n"
        "assert get_recipe('capdec').train is m.train_capdec is pairfree.train_capdec\n"
        "import pairfree.recipes.ifcap as m\n"
        "assert get_recipe('ifcap').train is m.train_ifcap is pairfree.train_ifcap\n"
        "import pairfree.recipes.pcmnet as m\n"
        "assert get_recipe('pcmnet').train is m.train_pcmnet is pairfree.train_pcmnet\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_unknown_recipe_names_the_known_ones():
    from pairfree.errors import PairfreeError
    from pairfree.recipes import get_recipe

    with pytest.raises(
        PairfreeError, match="capdec, cgtgan, icsd, ifcap, pcmnet, sacap, scst-gan, viecap"
    ):
        get_recipe("capdek")
