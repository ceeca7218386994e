"""Lesion-grouped, stratified, seeded split."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from skinfusion.data.records import ISIC_CLASSES, Record
from skinfusion.data.split import SPLITS, assign_splits, check_no_leakage, group_label
from skinfusion.errors import DataError


def _records(counts: dict[str, int], group_sizes: list[int] | None = None, seed: int = 0) -> list[Record]:
    """Images per class; with group_sizes, consecutive images of a class share a lesion id."""
    rng = random.Random(seed)
    records, k = [], 0
    for label, n in counts.items():
        left, g = n, 0
        while left:
            size = min(left, rng.choice(group_sizes)) if group_sizes else 1
            for _ in range(size):
                lesion = f"L_{label}_{g}" if group_sizes else None
                records.append(Record(image=Path(f"ISIC_{k:07d}.jpg"), label=label, lesion_id=lesion))
                k += 1
            left -= size
            g += 1
    rng.shuffle(records)
    return records


def _per_class(records, splits):
    return Counter((r.label, splits[r.id]) for r in records)


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.7, 0.15, 0.15), (0.6, 0.2, 0.2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_ungrouped_per_class_counts_within_one(fractions, seed):
    counts = dict(zip(ISIC_CLASSES, [1113, 6705, 514, 327, 1099, 115, 142], strict=True))
    records = _records(counts, seed=seed) + [Record(image=Path(f"U_{i}.jpg")) for i in range(37)]
    splits = assign_splits(records, fractions, seed=seed)
    per = _per_class(records, splits)
    for label, n in [*counts.items(), (None, 37)]:
        for k, split in enumerate(SPLITS):
            assert abs(per[label, split] - fractions[k] * n) <= 1, (label, split, per[label, split], fractions[k] * n)
    total = Counter(splits.values())
    for k, split in enumerate(SPLITS):
        assert abs(total[split] - fractions[k] * len(records)) <= 2


def test_small_counts_within_one():
    for n in range(1, 40):
        records = _records({"MEL": n})
        per = _per_class(records, assign_splits(records))
        for k, split in enumerate(SPLITS):
            assert abs(per["MEL", split] - (0.8, 0.1, 0.1)[k] * n) <= 1, (n, split)


def test_grouped_no_leakage_and_near_fractions():
    counts = dict(zip(ISIC_CLASSES, [800, 3000, 400, 250, 700, 90, 110], strict=True))
    records = _records(counts, group_sizes=[1, 1, 1, 2, 2, 3, 4, 6], seed=3)
    splits = assign_splits(records, (0.8, 0.1, 0.1), seed=0)
    check_no_leakage(records, splits)
    by_group: dict[str, set[str]] = {}
    for r in records:
        by_group.setdefault(r.group, set()).add(splits[r.id])
    assert all(len(s) == 1 for s in by_group.values())
    per = _per_class(records, splits)
    for label, n in counts.items():
        for k, split in enumerate(SPLITS):
            # Groups of up to 6 images: the greedy fill overshoots by less than one group.
            assert abs(per[label, split] - (0.8, 0.1, 0.1)[k] * n) <= 6, (label, split)


def test_grouped_singletons_and_pairs_within_one_where_feasible():
    # Every class has an even count split into pairs; targets are multiples of 2 -> exact.
    records = [
        Record(image=Path(f"{c}_{i}.jpg"), label=c, lesion_id=f"{c}_L{i // 2}")
        for c in ("MEL", "NV")
        for i in range(40)
    ]
    per = _per_class(records, assign_splits(records, (0.8, 0.1, 0.1)))
    for c in ("MEL", "NV"):
        assert abs(per[c, "train"] - 32) <= 1
        assert abs(per[c, "val"] - 4) <= 1
        assert abs(per[c, "test"] - 4) <= 1


def test_seeded_reproducible_and_seed_dependent():
    records = _records({"MEL": 100, "NV": 300}, group_sizes=[1, 2, 3])
    a = assign_splits(records, seed=5)
    assert a == assign_splits(records, seed=5)
    assert a == assign_splits(list(reversed(records)), seed=5)  # independent of record order
    assert a != assign_splits(records, seed=6)


def test_fixed_splits_kept_with_their_group():
    records = [
        Record(image=Path("a.jpg"), label="MEL", lesion_id="L1"),
        Record(image=Path("b.jpg"), label="MEL", lesion_id="L1"),
        *[Record(image=Path(f"x{i}.jpg"), label="MEL") for i in range(20)],
    ]
    splits = assign_splits(records, fixed={"a": "test"})
    assert splits["a"] == splits["b"] == "test"
    with pytest.raises(DataError, match="fixed to several splits"):
        assign_splits(records, fixed={"a": "test", "b": "train"})


def test_zero_fraction_split_stays_empty():
    splits = assign_splits(_records({"MEL": 50, "NV": 7}), (0.9, 0.1, 0.0))
    assert "test" not in splits.values()


@pytest.mark.parametrize("fractions", [(0.8, 0.1), (0.8, 0.3, 0.1), (1.2, -0.1, -0.1)])
def test_bad_fractions(fractions):
    with pytest.raises(ValueError, match="fractions"):
        assign_splits(_records({"MEL": 3}), fractions)


def test_group_label_majority_then_first():
    mk = lambda label: Record(image=Path(f"{random.random()}.jpg"), label=label)  # noqa: E731
    assert group_label([mk("NV"), mk("MEL"), mk("MEL")]) == "MEL"
    assert group_label([mk("NV"), mk("MEL")]) == "NV"
    assert group_label([mk(None)]) is None


def test_leakage_detected():
    records = [Record(image=Path("a.jpg"), lesion_id="L"), Record(image=Path("b.jpg"), lesion_id="L")]
    with pytest.raises(DataError, match="span several splits"):
        check_no_leakage(records, {"a": "train", "b": "val"})


def test_assign_folds_keeps_lesions_together_and_spreads_every_class():
    """Cross-validation folds: no lesion in two folds, each class's lesions spread evenly, every image once."""
    from skinfusion.data.split import assign_folds

    records = []
    for label, lesions in (("NV", 60), ("DF", 11), ("VASC", 7)):
        for lesion in range(lesions):
            for _image in range(1 + lesion % 3):  # 1-3 images a lesion
                records.append(Record(image=f"ISIC_{len(records):07d}.jpg", label=label, lesion_id=f"{label}{lesion}"))
    folds = assign_folds(records, 5, seed=0)
    assert set(folds) == {r.id for r in records}
    assert set(folds.values()) == set(range(5))
    check_no_leakage(records, {k: str(v) for k, v in folds.items()})
    for label, lesions in (("NV", 60), ("DF", 11), ("VASC", 7)):
        per_fold = [len({r.lesion_id for r in records if r.label == label and folds[r.id] == k}) for k in range(5)]
        assert sum(per_fold) == lesions
        assert max(per_fold) - min(per_fold) <= 2, (label, per_fold)
    assert assign_folds(records, 5, seed=0) == folds
    assert assign_folds(records, 5, seed=1) != folds
    with pytest.raises(ValueError, match="folds"):
        assign_folds(records, 1)
