"""``pairfree train RECIPE``: train a captioner with one of the recipes."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

# recipe name -> (module, config class, train function)
RECIPES = {
    "capdec": ("pairfree.recipes.capdec", "CapDecConfig", "train_capdec"),
    "cgtgan": ("pairfree.recipes.cgtgan", "CgtGanConfig", "train_cgtgan"),
    "scst-gan": ("pairfree.recipes.scst_gan", "ScstGanConfig", "train_scst_gan"),
}


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a captioner with a recipe (capdec, ...)",
        description=(
            "Train a captioner. Settings come from the recipe's paper defaults, then --config "
            "YAML, then key.path=value overrides (e.g. train.lr=1e-5 noise.variance=0). "
            "Runs resume from the newest checkpoint in train.output_dir. For many GPUs: "
            "`accelerate launch -m pairfree.cli train ...`."
        ),
    )
    p.add_argument("recipe", choices=sorted(RECIPES), help="which recipe to train")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--config", type=Path, default=None, help="YAML config file")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=run)


def resolve(recipe: str, data: dict | None, overrides: list[str]):
    """(config, train function) of ``recipe`` from config data and overrides."""
    from pairfree.config import build_config
    from pairfree.errors import PairfreeError

    if recipe not in RECIPES:
        raise PairfreeError(f"unknown recipe {recipe!r}; known: {', '.join(sorted(RECIPES))}")
    module_name, cls_name, fn_name = RECIPES[recipe]
    module = importlib.import_module(module_name)
    return build_config(getattr(module, cls_name), data, overrides), getattr(module, fn_name)


def run(args: argparse.Namespace) -> int:
    import yaml

    from pairfree.config import read_yaml, to_dict
    from pairfree.errors import PairfreeError

    data = read_yaml(args.config) if args.config else {}
    # an experiment YAML (`pairfree run`) also names its recipe and how to evaluate
    recipe = data.pop("recipe", args.recipe)
    if recipe != args.recipe:
        raise PairfreeError(f"{args.config} is a {recipe} config, not {args.recipe}")
    data.pop("evaluation", None)
    cfg, train = resolve(args.recipe, data, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    result = train(cfg, resume=not args.no_resume, progress=not args.no_progress)
    best = (
        f"; best {cfg.train.select_metric} {result.best_metric:.4g} -> {result.best_dir}"
        if result.best_dir
        else ""
    )
    print(f"trained {result.global_step} steps; last -> {result.last_dir}{best}")
    return 0
