"""Intervals that count what varies between runs: the images scored *and* the training seed.

A bootstrap over the test images of one run (or of seed-averaged predictions) says how much the figure would
move on other images from the same distribution, but not how much it moves when the network is trained again
with another seed, which on small data is often the larger part. :func:`two_level_bootstrap` resamples both:
each replicate draws the seeds with replacement, then the lesions (with replacement, within each class so
that every class keeps its support), and averages the statistic over the drawn seeds on the drawn images.

With few seeds (2 or 3) the seed level is coarse: the interval is wide, honestly so, since 2 or 3 runs say
little about the spread of a training procedure.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence

import numpy as np

__all__ = ["balanced_accuracy_statistic", "group_indices", "two_level_bootstrap"]


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
        statistic: ``statistic(seed_draws, items) -> float``: ``seed_draws`` holds one array of run indices per arm
            (one arm for a figure, two for a difference of two variants: each arm's seeds are drawn on their own),
            ``items`` the image indices (with repeats) of the replicate. On the original data it is called with
            every run once and every image once.
        n_seeds: runs per arm (an int: one arm).
        groups: the resampling unit of each image, e.g. its lesion: images of one lesion are drawn together.
        strata: optional class of each image: groups are drawn within their stratum, so every class keeps the
            number of groups it has (balanced accuracy needs every class present).
        n_resamples, confidence_level: of the percentile interval.
        seed: of the resampling.

    Returns:
        ``(estimate on the data as it is, low, high)``.
    """
    arms = [n_seeds] if isinstance(n_seeds, int) else list(n_seeds)
    if not arms or min(arms) < 1:
        raise ValueError(f"every arm needs at least one run, got {arms}")
    if not 0 < confidence_level < 1:
        raise ValueError(f"confidence_level must be in (0, 1), got {confidence_level}")
    strata_groups = group_indices(groups, strata)
    estimate = statistic([np.arange(k) for k in arms], np.arange(len(groups)))
    rng = np.random.default_rng(seed)
    values = np.empty(n_resamples)
    for b in range(n_resamples):
        draws = [rng.integers(0, k, size=k) for k in arms]
        picked = [members[j] for members in strata_groups for j in rng.integers(0, len(members), size=len(members))]
        values[b] = statistic(draws, np.concatenate(picked))
    alpha = (1 - confidence_level) / 2
    low, high = np.nanquantile(values, [alpha, 1 - alpha])
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
