"""Lesion-grouped, label-stratified, seeded train/val/test split.

HAM10000 holds several images of one lesion; if they straddle splits, the scores leak. So whole
groups (``Record.group``) are assigned, stratified by the group's label (unlabelled groups form their
own stratum), greedily by largest remainder: within a stratum the groups are shuffled with the seed,
sorted by size (largest first, stable), and each goes to the split furthest below its target
``fraction * stratum size`` (ties: furthest below its overall target, then split order). Per-class
counts land within ±1 of the target for single images, within about the largest group size otherwise.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence

from skinfusion.data.records import Record
from skinfusion.errors import DataError

__all__ = ["SPLITS", "assign_folds", "assign_splits", "check_no_leakage", "group_label", "normalized_fractions"]

#: Split names, in the order of ``fractions``.
SPLITS: tuple[str, str, str] = ("train", "val", "test")


def group_label(records: Sequence[Record]) -> str | None:
    """A group's stratum: its most frequent label (ties: the first seen), or ``None`` if unlabelled."""
    counts = Counter(r.label for r in records if r.label is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(r.label for r in records if r.label is not None and counts[r.label] == top)


def normalized_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    """Scale three non-negative ``(train, val, test)`` weights with a positive sum so that they sum to 1."""
    values = tuple(float(f) for f in fractions)
    if len(values) != len(SPLITS) or min(values) < 0 or sum(values) <= 0:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test), got {fractions}")
    return tuple(f / sum(values) for f in values)


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != len(SPLITS):
        raise ValueError(f"fractions must have {len(SPLITS)} values (train, val, test), got {fractions}")
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    return fractions


def assign_splits(
    records: Sequence[Record],
    fractions: Sequence[float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    *,
    fixed: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Assign every record to ``train``/``val``/``test``, keeping each group in one split.

    Args:
        records: the records (ids must be unique).
        fractions: target fractions of (train, val, test); non-negative, summing to 1. A split
            with fraction 0 gets no free group.
        fixed: ``{image_id: split}`` decided beforehand (e.g. a manifest's ``split`` column); the
            whole group of such an image goes there and counts towards the targets.

    Returns:
        ``{image_id: split}`` for every record.

    Raises:
        ValueError: bad ``fractions`` or a fixed split name that is not a split.
        DataError: one group fixed to two different splits.
    """
    fractions = _check_fractions(fractions)
    fixed = dict(fixed or {})
    bad = {s for s in fixed.values() if s not in SPLITS}
    if bad:
        raise ValueError(f"fixed splits must be one of {SPLITS}, got {sorted(bad)}")
    return _assign_groups(records, SPLITS, fractions, seed, fixed)


def assign_folds(records: Sequence[Record], folds: int, seed: int = 0) -> dict[str, int]:
    """Assign every record to one of ``folds`` lesion-grouped, label-stratified folds (for cross-validation).

    Every group (lesion) lands in one fold, and each class is spread over the folds as evenly as its groups
    allow (the greedy largest-remainder rule of :func:`assign_splits`), so that the out-of-fold predictions of
    ``folds`` runs score every lesion once, rare classes included.

    Returns:
        ``{image_id: fold}`` with folds ``0 .. folds - 1``.

    Raises:
        ValueError: ``folds`` below 2.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    names = tuple(str(k) for k in range(folds))
    assigned = _assign_groups(records, names, (1.0 / folds,) * folds, seed, {})
    return {rid: int(fold) for rid, fold in assigned.items()}


def _assign_groups(
    records: Sequence[Record],
    names_out: Sequence[str],
    fractions: Sequence[float],
    seed: int,
    fixed: Mapping[str, str],
) -> dict[str, str]:
    """The greedy group assignment shared by :func:`assign_splits` and :func:`assign_folds`."""
    ids = [r.id for r in records]  # Record.id parses the path: compute it once
    record_group = [r.group for r in records]
    groups: dict[str, list[Record]] = defaultdict(list)
    group_ids: dict[str, list[str]] = defaultdict(list)
    for record, rid, group in zip(records, ids, record_group, strict=True):
        groups[group].append(record)
        group_ids[group].append(rid)

    group_split: dict[str, str] = {}
    for name, members in group_ids.items():
        wanted = {fixed[i] for i in members if i in fixed}
        if len(wanted) > 1:
            raise DataError(None, f"group {name} is fixed to several splits {sorted(wanted)}: {members}")
        if wanted:
            group_split[name] = wanted.pop()

    strata: dict[str | None, list[str]] = defaultdict(list)
    for name, members in groups.items():
        strata[group_label(members)].append(name)

    open_splits = [k for k, f in enumerate(fractions) if f > 0]
    total = len(records)
    overall = [0] * len(names_out)
    for name, split in group_split.items():
        overall[names_out.index(split)] += len(groups[name])

    rng = random.Random(seed)
    # Sorted strata (None last) so that the result does not depend on record order beyond the shuffle.
    for label in sorted(strata, key=lambda s: (s is None, s or "")):
        names = sorted(strata[label])
        size = sum(len(groups[n]) for n in names)
        counts = [0] * len(names_out)
        for n in names:
            if n in group_split:
                counts[names_out.index(group_split[n])] += len(groups[n])
        free = [n for n in names if n not in group_split]
        rng.shuffle(free)
        free.sort(key=lambda n: -len(groups[n]))
        for n in free:
            k = max(
                open_splits,
                key=lambda k: (
                    fractions[k] * size - counts[k],
                    fractions[k] * total - overall[k],
                    -k,
                ),
            )
            group_split[n] = names_out[k]
            counts[k] += len(groups[n])
            overall[k] += len(groups[n])

    return {rid: group_split[group] for rid, group in zip(ids, record_group, strict=True)}


def check_no_leakage(records: Sequence[Record], splits: Mapping[str, str]) -> None:
    """Raise ``DataError`` when one group (lesion) has images in two splits."""
    seen: dict[str, set[str]] = defaultdict(set)
    for record in records:
        seen[record.group].add(splits[record.id])
    leaked = {g: sorted(s) for g, s in seen.items() if len(s) > 1}
    if leaked:
        sample = ", ".join(f"{g}: {s}" for g, s in list(leaked.items())[:10])
        raise DataError(None, f"{len(leaked)} lesion group(s) span several splits: {sample}")
