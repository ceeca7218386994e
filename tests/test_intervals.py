"""skinfusion.evaluation.intervals: the two-level (seed, lesion) bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from skinfusion.evaluation.intervals import balanced_accuracy_statistic, group_indices, two_level_bootstrap
from skinfusion.evaluation.study import bootstrap_difference


def _runs(accuracies, n, rng):
    """(runs, n) correctness: run r right on each image with probability accuracies[r]."""
    return np.stack([rng.random(n) < a for a in accuracies])


def test_seed_noise_is_not_called_a_difference_although_an_image_bootstrap_would():
    """Two variants whose runs come from one distribution (seed accuracies spread 0.55-0.85 either way): the
    two-level interval of their difference holds 0; resampling only the images of the seed-averaged runs
    excludes 0 and would call them different."""
    rng = np.random.default_rng(0)
    n = 3000
    truth = np.arange(n) % 2
    a = _runs([0.55, 0.85, 0.70], n, rng)
    b = _runs([0.62, 0.78, 0.80], n, rng)
    stat_a = balanced_accuracy_statistic(a, truth, 2)
    stat_b = balanced_accuracy_statistic(b, truth, 2)

    def difference(draws, items):
        return stat_b([draws[1]], items) - stat_a([draws[0]], items)

    estimate, low, high = two_level_bootstrap(difference, (3, 3), np.arange(n), strata=truth, n_resamples=1000)
    every = np.arange(3)
    image_only = bootstrap_difference(lambda i: stat_b([every], i), lambda i: stat_a([every], i), n, n_resamples=1000)
    assert estimate == pytest.approx(image_only[0])
    assert estimate > 0.02
    assert low < 0 < high, (low, high)
    assert image_only[1] > 0, image_only  # the image-only interval excludes 0: it would declare a difference


def test_two_level_bootstrap_finds_a_real_difference_and_keeps_lesions_together():
    """A difference far beyond the seed spread is declared (interval excludes 0); images of one lesion are drawn
    together and every class keeps its number of lesions in every replicate."""
    rng = np.random.default_rng(1)
    n = 600
    lesions = np.arange(n) // 2  # two images a lesion, 100 lesions a class
    truth = lesions % 3
    a = _runs([0.50, 0.52, 0.48], n, rng)
    b = _runs([0.80, 0.82, 0.78], n, rng)
    seen = []

    def difference(draws, items):
        drawn, counts = np.unique(lesions[items], return_counts=True)
        seen.append((np.all(counts % 2 == 0), np.bincount(drawn % 3, weights=counts, minlength=3)))
        return balanced_accuracy_statistic(b, truth, 3)([draws[1]], items) - balanced_accuracy_statistic(a, truth, 3)(
            [draws[0]], items
        )

    estimate, low, high = two_level_bootstrap(difference, (3, 3), lesions, strata=truth, n_resamples=200)
    assert low > 0.2
    assert estimate > low
    assert all(pairs for pairs, _ in seen)
    assert all(np.array_equal(per_class, [200, 200, 200]) for _, per_class in seen)


def test_balanced_accuracy_statistic_by_hand():
    truth = np.array([0, 0, 0, 1, 2, 2])
    correct = np.array([[1, 1, 0, 1, 0, 1], [0, 0, 0, 0, 1, 1]], bool)
    statistic = balanced_accuracy_statistic(correct, truth, 4)  # class 3 absent: left out
    # run 0: recalls 2/3, 1, 1/2 -> 13/18; run 1: 0, 0, 1 -> 1/3
    assert statistic([np.array([0])], np.arange(6)) == pytest.approx(13 / 18)
    assert statistic([np.array([0, 1])], np.arange(6)) == pytest.approx((13 / 18 + 1 / 3) / 2)
    assert statistic([np.array([0])], np.array([0, 0, 3])) == pytest.approx((1 + 1) / 2)


def test_group_indices_by_stratum():
    groups = group_indices(["L1", "L1", "L2", "L3"], ["MEL", "MEL", "NV", "MEL"])
    assert [[g.tolist() for g in stratum] for stratum in groups] == [[[0, 1], [3]], [[2]]]
    with pytest.raises(ValueError, match="strata"):
        group_indices(["a"], ["x", "y"])
