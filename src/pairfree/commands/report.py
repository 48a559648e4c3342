"""``pairfree report``: an HTML page of training runs."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "report",
        help="an HTML report of training runs (curves, config, versions, evaluations)",
        description=(
            "Write one self-contained HTML page for the given training run folders "
            "(train.output_dir): loss and validation-metric curves, the config, seed, command "
            "line, versions and wall time of each run, its evaluation tables (from `pairfree "
            "run`) and a glossary of the metrics. Open it in any browser."
        ),
    )
    p.add_argument("runs", nargs="+", type=Path, help="training run folders")
    p.add_argument("--out", type=Path, default=Path("report.html"), help="default: report.html")
    p.add_argument("--title", default="pairfree runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pairfree.evaluate.runs import run_report
    from pairfree.io import atomic_write_text, check_output
    from pairfree.locks import output_lock

    runs = list({run.resolve(): run for run in args.runs}.values())  # each run once
    check_output(args.out, inputs=runs)
    with output_lock(args.out):
        atomic_write_text(args.out, run_report(runs, title=args.title))
        print(f"report of {len(runs)} run(s) -> {args.out}")
        return 0
