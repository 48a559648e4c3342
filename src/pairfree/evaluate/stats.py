"""Confidence intervals and paired comparisons of caption scores, by bootstrap over test images
and training seeds.

A score table says how a method did on *these* test images with *these* seeds; a claim that
one method beats another needs to know how much of the difference would survive other draws
of both. The bootstrap here resamples the two sources of that variation together: the seeds
(with replacement, when there are several) and, within them, the test images (with
replacement). A comparison is *paired*: both methods are scored on the same images with the
same seeds, and the resampled quantity is the per-(seed, image) difference, so what the two
share (an image that is hard for everyone, a lucky seed) cancels (Koehn 2004, "Statistical
significance tests for machine translation evaluation", applies the same paired bootstrap to
BLEU).

Only metrics that are a mean over images can be resampled this way: CIDEr-D (its document
frequencies come from the references alone, so a corpus score is exactly the mean of the
per-image scores), ROUGE-L, SPICE, CLIPScore and the world's truth metrics. Corpus BLEU and
METEOR are not means of per-image scores.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from pairfree.errors import PairfreeError

CHUNK = 256  # resamples drawn at once (bounds the memory: CHUNK x seeds x images indices)


@dataclass(frozen=True)
class Interval:
    """A mean with its bootstrap standard error and percentile confidence interval."""

    mean: float
    low: float
    high: float
    stderr: float
    confidence: float

    def excludes(self, value: float = 0.0) -> bool:
        return not self.low <= value <= self.high

    def __str__(self) -> str:
        return f"{self.mean:.1f} [{self.low:.1f}, {self.high:.1f}]"


@dataclass(frozen=True)
class Comparison:
    """A paired comparison of method A with method B on the same images and seeds."""

    a: Interval
    b: Interval
    difference: Interval  # A - B
    p_value: float  # two-sided: how often the resampled difference falls on the other side of 0
    n_images: int
    n_seeds: int
    resamples: int

    @property
    def significant(self) -> bool:
        """Whether the interval of the difference excludes 0."""
        return self.difference.excludes(0.0)

    def to_json(self) -> dict:
        return asdict(self)


def _as_matrix(scores: np.ndarray | list, name: str) -> np.ndarray:
    """[seeds, images] float64; one seed may be given as a flat vector."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim == 1:
        values = values[None, :]
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] < 1:
        raise PairfreeError(f"{name}: scores must be [seeds, images] with at least one of each, "
                            f"not shape {values.shape}")  # fmt: skip
    if not np.isfinite(values).all():
        raise PairfreeError(f"{name}: scores must be finite numbers")
    return values


def _resampled_means(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The mean of ``values`` [seeds, images] over ``resamples`` bootstrap draws: seeds drawn
    with replacement (when there are several), then images drawn with replacement."""
    seeds, images = values.shape
    means = np.empty(resamples)
    for start in range(0, resamples, CHUNK):
        n = min(CHUNK, resamples - start)
        s = rng.integers(seeds, size=(n, seeds)) if seeds > 1 else np.zeros((n, 1), dtype=int)
        i = rng.integers(images, size=(n, images))
        means[start : start + n] = values[s[:, :, None], i[:, None, :]].mean(axis=(1, 2))
    return means


def _interval(values: np.ndarray, means: np.ndarray, confidence: float) -> Interval:
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return Interval(float(values.mean()), float(low), float(high), float(means.std(ddof=1)),
                    confidence)  # fmt: skip


def _check(resamples: int, confidence: float) -> None:
    if resamples < 100:
        raise PairfreeError(f"resamples must be at least 100, not {resamples}")
    if not 0.0 < confidence < 1.0:
        raise PairfreeError(f"confidence must be between 0 and 1, not {confidence}")


def bootstrap_mean(
    scores: np.ndarray | list,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Interval:
    """The mean of per-image ``scores`` ([seeds, images], or [images]) with its interval."""
    _check(resamples, confidence)
    values = _as_matrix(scores, "scores")
    rng = np.random.default_rng(seed)
    return _interval(values, _resampled_means(values, resamples, rng), confidence)


def paired_bootstrap(
    a: np.ndarray | list,
    b: np.ndarray | list,
    *,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Comparison:
    """Compare per-image scores of two methods, ``[seeds, images]`` each, where row s and
    column i of both are the same seed and test image."""
    _check(resamples, confidence)
    a_values, b_values = _as_matrix(a, "A"), _as_matrix(b, "B")
    if a_values.shape != b_values.shape:
        raise PairfreeError(f"a paired comparison needs the same seeds and images on both "
                            f"sides: A is {a_values.shape}, B is {b_values.shape}")  # fmt: skip
    difference = a_values - b_values
    seeds, images = difference.shape
    # one draw of (seeds, images) per resample, shared by A, B and their difference
    draws = [np.random.default_rng(seed) for _ in range(3)]
    a_means, b_means, d_means = (
        _resampled_means(v, resamples, rng)
        for v, rng in zip((a_values, b_values, difference), draws, strict=True)
    )
    below, above = float((d_means <= 0).mean()), float((d_means >= 0).mean())
    p_value = 1.0 if difference.mean() == 0 else min(1.0, 2.0 * min(below, above))
    return Comparison(
        a=_interval(a_values, a_means, confidence),
        b=_interval(b_values, b_means, confidence),
        difference=_interval(difference, d_means, confidence),
        p_value=p_value,
        n_images=images,
        n_seeds=seeds,
        resamples=resamples,
    )


@dataclass(frozen=True)
class VarianceParts:
    """Where the noise in a paired difference comes from, as standard deviations of
    ``difference[s, i] = mean + seed[s] + image[i] + noise[s, i]``: what a test image adds on
    every seed (a hard image), what one training seed adds on every image, and the rest. More
    test images shrink the first and the last; only more seeds shrink the seed part."""

    image: float
    seed: float
    noise: float

    def stderr(self, images: int, seeds: int) -> float:
        """The standard error of the mean difference over ``images`` x ``seeds``."""
        return float(np.sqrt(self.image**2 / images + self.seed**2 / seeds
                             + self.noise**2 / (images * seeds)))  # fmt: skip

    def plan(self, target: float, *, max_seeds: int = 32) -> tuple[int, int] | None:
        """The fewest seeds, and with them the fewest test images, that bring the standard
        error to ``target``; None when ``max_seeds`` seeds cannot."""
        for seeds in range(1, max_seeds + 1):
            left = target**2 - self.seed**2 / seeds  # what the images may still add
            if left > 0:
                images = (self.image**2 + self.noise**2 / seeds) / left
                return seeds, max(1, int(np.ceil(images)))
        return None


def variance_parts(differences: np.ndarray | list) -> VarianceParts:
    """Moment estimates of the parts from per-image differences ``[seeds, images]`` (two or
    more seeds): the image part is the covariance of two seeds' differences over the same
    images, the seed part what the spread of the seed means holds beyond the noise."""
    d = _as_matrix(differences, "differences")
    seeds, images = d.shape
    if seeds < 2 or images < 2:
        raise PairfreeError(f"splitting the variance needs at least 2 seeds and 2 images, not "
                            f"{seeds} and {images}")  # fmt: skip
    covariance = np.cov(d)  # seeds x seeds, over images
    within = float(np.mean(np.diag(covariance)))
    shared = float(np.mean(covariance[~np.eye(seeds, dtype=bool)]))
    image = max(shared, 0.0)
    noise = max(within - image, 0.0)
    seed = max(float(np.var(d.mean(axis=1), ddof=1)) - noise / images, 0.0)
    return VarianceParts(image=float(np.sqrt(image)), seed=float(np.sqrt(seed)),
                         noise=float(np.sqrt(noise)))  # fmt: skip
