"""Intervals that count what varies between runs: the images scored *and* the training seed.

A bootstrap over the test images of one run (or of seed-averaged predictions) says how much the figure would
move on other images from the same distribution, but not how much it moves when the network is trained again
with another seed, which on small data is often the larger part. :func:`two_level_bootstrap` resamples both:
each replicate draws the seeds with replacement, then the lesions (with replacement, within each class so
that every class keeps its support), and averages the statistic over the drawn seeds on the drawn images.

A difference of two variants is a statistic of two *arms*: one draw of runs per variant, on one shared draw of
lesions. The lesions are paired (both variants are scored on the same images, so what the images share
cancels); the seeds are not: the runs of two variants are independent trainings, and the same
``seed_everything`` value in two different networks draws unrelated weights, so each arm's seeds are drawn on
their own. Pairing seed ``i`` with seed ``i`` would only be right where the seed sets something both runs
share (the data order, say), and then it should be one arm.

With few seeds (2 or 3) the seed level is coarse: the interval is wide, honestly so, since 2 or 3 runs say
little about the spread of a training procedure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

__all__ = [
    "balanced_accuracy_statistic",
    "group_indices",
    "percentile_interval",
    "two_level_bootstrap",
    "two_level_replicates",
]


def group_indices(groups: Sequence[Hashable], strata: Sequence[Hashable] | None = None) -> list[list[np.ndarray]]:
    """Item indices per group (e.g. the images of one lesion), gathered per stratum (e.g. the lesion's class).

    Returns:
        ``[[indices of group 1 of stratum 1, ...], [... of stratum 2], ...]``; strata in first-seen order.
    """
    if strata is not None and len(strata) != len(groups):
        raise ValueError(f"{len(groups)} groups but {len(strata)} strata")
    by_stratum: dict[Hashable, dict[Hashable, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, group in enumerate(groups):
        by_stratum[None if strata is None else strata[i]][group].append(i)
    return [[np.asarray(v) for v in members.values()] for members in by_stratum.values()]


def two_level_replicates(
    statistic: Callable[[Sequence[np.ndarray], np.ndarray], float | np.ndarray],
    n_seeds: int | Sequence[int],
    groups: Sequence[Hashable],
    strata: Sequence[Hashable] | None = None,
    n_resamples: int = 2000,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """A statistic on the data as it is and on ``n_resamples`` two-level replicates (seeds, then lesions).

    Args:
        statistic: ``statistic(seed_draws, items) -> float or array``: ``seed_draws`` holds one array of run
            indices per arm (one arm for a figure, two for a difference of two variants, more for several
            variants at once: each arm's seeds are drawn on their own), ``items`` the image indices (with repeats)
            of the replicate, shared by every arm. On the original data it is called with every run once and
            every image once. An array result gives several figures from the same replicates.
        n_seeds: runs per arm (an int: one arm).
        groups: the resampling unit of each image, e.g. its lesion: images of one lesion are drawn together.
        strata: optional class of each image: groups are drawn within their stratum, so every class keeps the
            number of groups it has (balanced accuracy needs every class present).
        seed: of the resampling.

    Returns:
        ``(estimate, values)``: the statistic's value (an array of its shape) and ``(n_resamples, *shape)``.
    """
    arms = [n_seeds] if isinstance(n_seeds, int) else list(n_seeds)
    if not arms or min(arms) < 1:
        raise ValueError(f"every arm needs at least one run, got {arms}")
    # Per stratum: its groups' items end to end, where each group starts, and its size.
    strata_groups = [
        (np.concatenate(members), np.cumsum(sizes) - sizes, sizes)
        for members in group_indices(groups, strata)
        for sizes in [np.array([len(m) for m in members])]
    ]
    estimate = np.asarray(statistic([np.arange(k) for k in arms], np.arange(len(groups))), dtype=float)
    rng = np.random.default_rng(seed)
    values = np.empty((n_resamples, *estimate.shape))
    for b in range(n_resamples):
        draws = [rng.integers(0, k, size=k) for k in arms]
        picked = []
        for items, starts, sizes in strata_groups:
            drawn = rng.integers(0, len(sizes), size=len(sizes))
            lengths = sizes[drawn]  # the drawn groups' items, in the order drawn
            within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            picked.append(items[np.repeat(starts[drawn], lengths) + within])
        values[b] = statistic(draws, np.concatenate(picked))
    return estimate, values


def percentile_interval(values: np.ndarray, confidence_level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """``(low, high)``: the percentile interval of replicates ``values`` (along axis 0; NaN replicates skipped)."""
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level}")
    alpha = (1 - confidence_level) / 2
    low, high = np.nanquantile(values, [alpha, 1 - alpha], axis=0)
    return low, high


def two_level_bootstrap(
    statistic: Callable[[Sequence[np.ndarray], np.ndarray], float],
    n_seeds: int | Sequence[int],
    groups: Sequence[Hashable],
    strata: Sequence[Hashable] | None = None,
    n_resamples: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """A statistic of several training runs with a percentile interval that resamples seeds, then lesions.

    Args:
        statistic, n_seeds, groups, strata, seed: as for :func:`two_level_replicates` (a float statistic).
        n_resamples, confidence_level: of the percentile interval.

    Returns:
        ``(estimate on the data as it is, low, high)``.
    """
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level}")
    estimate, values = two_level_replicates(statistic, n_seeds, groups, strata, n_resamples, seed)
    low, high = percentile_interval(values, confidence_level)
    return float(estimate), float(low), float(high)


def balanced_accuracy_statistic(
    correct: Sequence[np.ndarray] | np.ndarray, truth: np.ndarray, num_classes: int | None = None
) -> Callable[[Sequence[np.ndarray], np.ndarray], float]:
    """The seed-mean balanced accuracy (mean recall over the classes present) for :func:`two_level_bootstrap`.

    Args:
        correct: ``(runs, images)`` booleans: run ``r``'s argmax is the truth of image ``i``.
        truth: ``(images,)`` class indices.
    """
    correct = np.asarray(correct, dtype=float)
    truth = np.asarray(truth)
    k = int(num_classes or truth.max() + 1)

    def statistic(seed_draws: Sequence[np.ndarray], items: np.ndarray) -> float:
        labels = truth[items]
        support = np.bincount(labels, minlength=k)
        present = support > 0
        recalls = [
            (np.bincount(labels, weights=correct[run, items], minlength=k)[present] / support[present]).mean()
            for run in seed_draws[0]
        ]
        return float(np.mean(recalls))

    return statistic
