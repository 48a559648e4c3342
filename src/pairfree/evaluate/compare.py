"""Paired comparison of two methods' predictions on the same test images (and seeds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pairfree.errors import PairfreeError
from pairfree.evaluate.coco import format_ids, per_image_scores
from pairfree.evaluate.report import markdown_table, predictions_by_id
from pairfree.evaluate.stats import Comparison, paired_bootstrap


def compare_predictions(
    a: Sequence[list[dict]],
    b: Sequence[list[dict]],
    references: Mapping[str, Sequence[str]],
    *,
    metric: str = "CIDEr",
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    spice_dir: str | Path | None = None,
) -> Comparison:
    """Compare COCO results of method A with those of method B, one list per seed on each side
    (seed s of A is paired with seed s of B); every list must caption the same images."""
    if not a or len(a) != len(b):
        raise PairfreeError(f"a paired comparison needs the same number of seeds on both sides "
                            f"(at least one): A has {len(a)}, B has {len(b)}")  # fmt: skip
    runs = [predictions_by_id(p) for p in (*a, *b)]
    ids = sorted(runs[0])
    for n, run in enumerate(runs[1:], 1):
        if set(run) != set(ids):
            side, index = ("A", n) if n < len(a) else ("B", n - len(a))
            extra, missing = set(run) - set(ids), set(ids) - set(run)
            raise PairfreeError(
                f"{side} seed {index} does not caption the same images as A seed 0 "
                f"(missing {format_ids(sorted(missing))}; extra {format_ids(sorted(extra))}): "
                "a paired comparison scores both methods on the same images"
            )
    scores = []
    for run in runs:
        by_id = per_image_scores(run, references, metric=metric, spice_dir=spice_dir)
        scores.append([by_id[i] for i in ids])
    matrix = np.asarray(scores)
    return paired_bootstrap(matrix[: len(a)], matrix[len(a) :], resamples=resamples,
                            confidence=confidence, seed=seed)  # fmt: skip


def comparison_table(comparison: Comparison, names: tuple[str, str], metric: str) -> str:
    """A markdown table: each method's mean with its interval, and their difference."""
    c = comparison
    level = f"{round(100 * c.difference.confidence)} % CI"
    rows = [
        [names[0], f"{c.a.mean:.2f}", f"[{c.a.low:.2f}, {c.a.high:.2f}]", f"{c.a.stderr:.2f}", ""],
        [names[1], f"{c.b.mean:.2f}", f"[{c.b.low:.2f}, {c.b.high:.2f}]", f"{c.b.stderr:.2f}", ""],
        [
            "A - B",
            f"{c.difference.mean:+.2f}",
            f"[{c.difference.low:+.2f}, {c.difference.high:+.2f}]",
            f"{c.difference.stderr:.2f}",
            f"{c.p_value:.4f}",
        ],
    ]
    table = markdown_table([metric, "mean", level, "std. error", "p"], rows)
    verdict = (
        "the interval of the difference excludes 0: "
        + ("A is ahead" if c.difference.mean > 0 else "B is ahead")
        if c.significant
        else "the interval of the difference includes 0: a tie at this confidence"
    )
    return (
        f"{table}\n\n{c.n_images} images x {c.n_seeds} seed(s), paired bootstrap over images "
        f"and seeds ({c.resamples} resamples): {verdict}.\n"
    )
