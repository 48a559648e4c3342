"""``pairfree train RECIPE``: train a captioner with one of the recipes."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.recipes import recipe_names


def register(sub) -> None:
    p = sub.add_parser(
        "train",
        help=f"train a captioner with a recipe ({', '.join(recipe_names())})",
        description=(
            "Train a captioner. Settings come from the recipe's paper defaults, then --config "
            "YAML, then key.path=value overrides (e.g. train.lr=1e-5 noise.variance=0). "
            "Runs resume from the newest checkpoint in train.output_dir. For many GPUs: "
            "`accelerate launch -m pairfree.cli train ...`."
        ),
    )
    p.add_argument("recipe", choices=recipe_names(), help="which recipe to train")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--config", type=Path, default=None, help="YAML config file")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (logs only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import yaml

    from pairfree.config import read_yaml, to_dict
    from pairfree.errors import PairfreeError
    from pairfree.io import check_output
    from pairfree.locks import output_lock
    from pairfree.recipes import get_recipe

    data = read_yaml(args.config) if args.config else {}
    # an experiment YAML (`pairfree run`) also names its recipe and how to evaluate
    named = data.pop("recipe", args.recipe)
    if named != args.recipe:
        raise PairfreeError(f"{args.config} is a {named} config, not {args.recipe}")
    data.pop("evaluation", None)
    recipe = get_recipe(args.recipe)
    cfg = recipe.build_config(data, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        return 0
    check_output(Path(cfg.train.output_dir), folder=True)
    with output_lock(cfg.train.output_dir):
        result = recipe.train(cfg, resume=not args.no_resume, progress=not args.no_progress)
        best = (
            f"; best {cfg.train.select_metric} {result.best_metric:.4g} -> {result.best_dir}"
            if result.best_dir
            else ""
        )
        print(f"trained {result.global_step} steps; last -> {result.last_dir}{best}")
        return 0
