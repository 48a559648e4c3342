"""``pairfree compare``: is method A ahead of method B? A paired bootstrap over test images and
seeds."""

from __future__ import annotations

import argparse
from pathlib import Path

from pairfree.commands.common import at_least


def register(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="paired comparison of two methods' captions: difference with a confidence interval",
        description=(
            "Score two methods' captions of the same test images per image (CIDEr-D by "
            "default) and compare them with a paired bootstrap over images and seeds: each "
            "method's mean and the difference A - B, each with its confidence interval, "
            "standard error and a two-sided p-value. A and B are each a predictions file "
            "(COCO results JSON) or a `pairfree run` folder (its captions_SPLIT.json); give "
            "several seeds as a comma-separated list on each side, paired in order. A "
            "difference whose interval includes 0 is a tie."
        ),
    )
    p.add_argument("a", help="method A: predictions file(s) or run folder(s), comma-separated")
    p.add_argument("b", help="method B: the same, with the same images and number of seeds")
    p.add_argument("references", type=Path, help="Karpathy/COCO/NoCaps JSON with references")
    p.add_argument("--split", default="test", help="split of a Karpathy file (default: test)")
    p.add_argument("--format", default="auto", help="references format (default: detect)")
    p.add_argument("--metric", default="CIDEr", choices=("CIDEr", "ROUGE_L", "SPICE"),
                   help="a per-image metric whose mean is the corpus score (default: CIDEr)")  # fmt: skip
    p.add_argument("--resamples", type=at_least(100), default=10_000, help="default: 10000")
    p.add_argument("--confidence", type=share, default=0.95,
                   help="level of the intervals, between 0 and 1 (default: 0.95)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default: 0)")
    p.add_argument("--names", default="A,B", help="names of the two methods in the table")
    p.add_argument("--spice-dir", default=None, help="folder with SPICE and its CoreNLP jars")
    p.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    p.set_defaults(func=run)


def share(text: str) -> float:
    """An argparse type: a number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (0.95 for 95 %), not {text}")
    return value


def predictions_files(spec: str, split: str) -> list[Path]:
    """The predictions files of one side: each comma-separated item is a file, or a run
    folder whose ``captions_<split>.json`` is taken."""
    from pairfree.errors import PairfreeError

    paths = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise PairfreeError(f"{spec!r}: an empty name in the comma-separated list")
        path = Path(item)
        if path.is_dir():
            path = path / f"captions_{split}.json"
            if not path.is_file():
                raise PairfreeError(f"{item} is a folder without captions_{split}.json (a "
                                    "`pairfree run` folder holds one per evaluated split)")  # fmt: skip
        elif not path.is_file():
            raise PairfreeError(f"{item} does not exist")
        paths.append(path)
    return paths


def run(args: argparse.Namespace) -> int:
    from contextlib import nullcontext

    from pairfree.data import read_images
    from pairfree.errors import BadInputError, PairfreeError
    from pairfree.evaluate.compare import compare_predictions, comparison_table
    from pairfree.io import atomic_write_json, check_output, read_json
    from pairfree.locks import output_lock

    names = tuple(n.strip() for n in args.names.split(","))
    if len(names) != 2 or not all(names):
        raise PairfreeError(f"--names takes two names separated by a comma, not {args.names!r}")
    sides = [predictions_files(args.a, args.split), predictions_files(args.b, args.split)]
    if args.out is not None:
        check_output(args.out, inputs=[p for side in sides for p in side])
    with output_lock(args.out) if args.out is not None else nullcontext():
        loaded = []
        for side in sides:
            runs = []
            for path in side:
                predictions = read_json(path)
                if not isinstance(predictions, list):
                    raise BadInputError(path, "expected a JSON list of {image_id, caption} objects "
                                        "(COCO's results format)")  # fmt: skip
                runs.append(predictions)
            loaded.append(runs)
        items = read_images(args.references, format=args.format, split=args.split, files=False)
        references = {it.image_id: list(it.references) for it in items if it.references}
        comparison = compare_predictions(
            loaded[0], loaded[1], references, metric=args.metric, resamples=args.resamples,
            confidence=args.confidence, seed=args.seed, spice_dir=args.spice_dir,
        )  # fmt: skip
        print(comparison_table(comparison, names, args.metric), end="")
        if args.out is not None:
            files = {name: [str(p) for p in side] for name, side in zip(names, sides, strict=True)}
            atomic_write_json(args.out, {"metric": args.metric, "predictions": files,
                                         **comparison.to_json()})  # fmt: skip
            print(f"wrote {args.out}")
        return 0
