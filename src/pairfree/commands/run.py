"""``pairfree run``: a whole experiment (a paper row) from one config."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="encode -> train -> caption the test split -> evaluate, from one YAML",
        description=(
            "Run a whole experiment from a YAML that holds `recipe:`, the recipe's config and "
            "an `evaluation:` section (dataset, split, image_root, ...). Every stage resumes: "
            "features are cached, training continues from its newest checkpoint. Writes "
            "captions_<split>.json and metrics_<split>.{json,md} in train.output_dir."
        ),
    )
    p.add_argument("config", type=Path, help="experiment YAML (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pairfree.experiment import run_experiment

    report = run_experiment(args.config, args.overrides, progress=not args.no_progress)
    print(report.to_markdown())
    return 0
