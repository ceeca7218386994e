"""Pool the validation folds of a lesion-grouped cross-validation into one score of every lesion, per seed.

The 10 % test split of the ISIC 2018 pool holds 5 dermatofibroma lesions: no figure on it says much about DF
or VASC. K-fold cross-validation scores every lesion of the train+val pool once::

    for k in 0 .. K-1:  skinfusion fit ... --data.cv_folds K --data.cv_fold k --seed_everything S   (one run each)
                        skinfusion evaluate --ckpt RUN_k/best.ckpt --truth manifest.csv --cv-folds K --cv-fold k \\
                            --out S/fold_k
    skinfusion crossval --truth manifest.csv --run S0/fold_0 ... S0/fold_{K-1} --run S1/fold_0 ... --out cv

:func:`pool_crossval` joins the folds of each ``--run`` (one training seed), checks that they are the K folds
of one assignment and score each image once, and reports, per seed and as the seed mean with a two-level
bootstrap interval (seeds, then lesions within their class; :mod:`skinfusion.evaluation.intervals`):

* balanced accuracy with the metadata the data has and with it withheld (image only), and each class's recall
  both ways next to its support (images and lesions);
* the ISIC Task 1 thresholded Jaccard of every image with a mask, and of the ISIC 2018 Task 1 images alone.

Two options score the way a held-out check with one image per lesion does: ``source`` keeps only the images of
one manifest source (``isic_task3``: HAM10000, the images that have age, sex and site), and ``per_lesion``
counts every lesion once in the diagnosis metrics, as its images' mean correctness (the expected score of one
image drawn per lesion; in HAM10000 a lesion photographed several times otherwise counts several times).

It writes ``crossval.json`` and ``crossval.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from skinfusion.errors import DataError
from skinfusion.evaluation.intervals import balanced_accuracy_statistic, two_level_bootstrap
from skinfusion.evaluation.isic import read_classification_csv
from skinfusion.evaluation.study import md_row
from skinfusion.inference.inputs import collect_records
from skinfusion.io import atomic_write

__all__ = ["crossval_main", "pool_crossval"]

_WAYS = {"with_metadata": "predictions", "image_only": "image_only"}


def _read_fold(folder: Path) -> dict[str, Any]:
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise DataError(metrics_path, "not an evaluation folder (skinfusion evaluate --cv-folds K --cv-fold k)")
    metrics = json.loads(metrics_path.read_text())
    if "cv" not in metrics:
        raise DataError(metrics_path, "this evaluation scored no cross-validation fold (give evaluate --cv-folds)")
    fold: dict[str, Any] = {"cv": metrics["cv"], "folder": folder}
    for way, sub in _WAYS.items():
        path = folder / sub / "predictions.csv"
        if path.is_file():
            fold[way] = path
    segmentation = folder / "per_image_segmentation.csv"
    if segmentation.is_file():
        with open(segmentation, newline="") as f:
            fold["threshold_jaccard"] = {row["id"]: float(row["threshold_jaccard"]) for row in csv.DictReader(f)}
    return fold


def _join_run(folders: Sequence[str | Path], class_names: list[str] | None) -> tuple[dict, list[str], tuple]:
    """One seed's folds joined: ``({way: {id: probabilities}, "threshold_jaccard": {id: j}}, class names, cv)``."""
    folds = [_read_fold(Path(f)) for f in folders]
    assignment = {(f["cv"]["folds"], f["cv"]["seed"]) for f in folds}
    if len(assignment) != 1:
        raise DataError(Path(folders[0]), f"the folds of one run come from different assignments: {sorted(assignment)}")
    k, cv_seed = assignment.pop()
    numbers = sorted(f["cv"]["fold"] for f in folds)
    if numbers != list(range(k)):
        raise DataError(Path(folders[0]), f"a run needs each of the {k} folds once, got folds {numbers}")
    joined: dict[str, dict[str, Any]] = {}
    for fold in folds:
        for way in (*_WAYS, "threshold_jaccard"):
            if way not in fold:
                continue
            if way == "threshold_jaccard":
                values = fold[way]
            else:
                if class_names is None:
                    with open(fold[way], newline="") as f:
                        class_names = [c for c in next(csv.reader(f)) if c != "image"]
                ids, probabilities = read_classification_csv(fold[way], class_names)
                values = dict(zip(ids, probabilities, strict=True))
            target = joined.setdefault(way, {})
            twice = sorted(set(values) & set(target))
            if twice:
                raise DataError(fold["folder"], f"images scored in two folds: {twice[:5]}")
            target.update(values)
    return joined, class_names or [], (k, cv_seed)


def _manifest_sources(truth: str | Path) -> dict[str, str]:
    """``{id: source}`` from a prepared manifest's ``source`` column (the reader keeps only ``manifest``)."""
    path = Path(truth)
    if not (path.is_file() and path.suffix.lower() == ".csv"):
        return {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "source" not in (reader.fieldnames or []) or "id" not in (reader.fieldnames or []):
            return {}
        return {row["id"]: row["source"] for row in reader}


def _units(
    lesions: Sequence[str], truth_idx: np.ndarray, ids: Sequence[str], truth: Path
) -> tuple[tuple[list[str], np.ndarray], np.ndarray]:
    """``((lesion names, their class), index of each image's lesion)``; a lesion of two diagnoses is refused."""
    names = sorted(set(lesions))
    index = {name: j for j, name in enumerate(names)}
    unit_of = np.array([index[lesion] for lesion in lesions])
    classes = np.full(len(names), -1)
    for image, j, c in zip(ids, unit_of, truth_idx, strict=True):
        if classes[j] not in (-1, c):
            raise DataError(truth, f"lesion {names[j]!r} has images of two diagnoses (e.g. {image}): not one unit")
        classes[j] = c
    return (names, classes), unit_of


def _mean_sd(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else math.nan


def pool_crossval(
    truth: str | Path,
    runs: Sequence[Sequence[str | Path]],
    out_dir: str | Path | None = None,
    n_resamples: int = 2000,
    confidence_level: float = 0.95,
    per_lesion: bool = False,
    source: str | None = None,
) -> dict[str, Any]:
    """Pool each run's cross-validation folds and score them per seed and as a seed mean (module docstring).

    Args:
        truth: the manifest the folds were drawn from (labels, lesions, sources).
        runs: one list of ``skinfusion evaluate --cv-folds`` folders per training seed, each holding every fold.
        out_dir: where to write ``crossval.json`` and ``crossval.md`` (``None``: nothing written).
        per_lesion: count every lesion once in the diagnosis metrics (its images' mean correctness).
        source: score only the images of this manifest ``source`` (e.g. ``isic_task3``), diagnosis and masks.

    Returns:
        The report: ``runs``, ``folds``, ``support`` (per class: images, lesions), and per metric its
        per-seed values, seed mean and sd, and the two-level interval.

    Raises:
        DataError: a folder that is not a fold evaluation, folds missing or repeated, runs scoring different
            images, or a scored image that ``truth`` does not hold. Images without a diagnosis in ``truth``
            (mask-only) are left out of the diagnosis metrics and counted (``without_diagnosis``). With
            ``source``: a manifest without a ``source`` column, or no scored image of that source; with
            ``per_lesion``: a lesion whose images carry different diagnoses.
    """
    if not runs:
        raise ValueError("give at least one run (a list of fold evaluation folders)")
    records = {r.id: r for r in collect_records(truth)}
    sources = _manifest_sources(truth)
    if source is not None and not sources:
        raise DataError(Path(truth), "has no 'source' column: cannot score one source (prepare writes one)")
    class_names: list[str] | None = None
    joined = []
    assignments = set()
    for folders in runs:
        run, class_names, assignment = _join_run(folders, class_names)
        joined.append(run)
        assignments.add(assignment)
    if len(assignments) != 1:
        raise DataError(Path(runs[0][0]), f"the runs use different fold assignments: {sorted(assignments)}")
    if "with_metadata" not in joined[0]:
        raise DataError(Path(runs[0][0]), "the folds hold no diagnosis predictions (predictions/predictions.csv)")
    unknown = sorted(i for run in joined for way in _WAYS for i in run.get(way, {}) if i not in records)
    if unknown:
        raise DataError(Path(truth), f"scored images that are not in this manifest: {unknown[:5]}")

    def labelled(scored: dict[str, Any]) -> list[str]:
        # A mask-only image (no diagnosis in the manifest, e.g. Task 1's) has a diagnosis prediction but no truth:
        # evaluate's image-only pass leaves it out, and so does the pooled diagnosis (counted in the report).
        return sorted(i for i in scored if records[i].label)

    ids = labelled(joined[0]["with_metadata"])
    for run, folders in zip(joined, runs, strict=True):
        for way in _WAYS:
            if way in run and labelled(run[way]) != ids:
                raise DataError(Path(folders[0]), f"this run's {way} predictions score other images than the first run")
    if not ids:
        raise DataError(Path(truth), "no scored image has a diagnosis in this manifest")
    no_diagnosis = len(joined[0]["with_metadata"]) - len(ids)
    if source is not None:
        scored_sources = sorted({sources.get(i, "") for i in ids})
        ids = [i for i in ids if sources.get(i) == source]
        if not ids:
            raise DataError(Path(truth), f"no scored image with a diagnosis has source {source!r}: {scored_sources}")
    truth_idx = np.array([class_names.index(records[i].label) for i in ids])
    lesions = [records[i].group for i in ids]
    k = len(class_names)
    # The unit the diagnosis metrics count: an image, or a lesion (its images' mean correctness).
    units, unit_of = _units(lesions, truth_idx, ids, Path(truth)) if per_lesion else (None, None)
    report: dict[str, Any] = {
        "runs": len(runs),
        "folds": assignments.pop()[0],
        "class_names": class_names,
        "num_images": len(ids),
        "num_lesions": len(set(lesions)),
        "per_lesion": per_lesion,
        "source": source,
        "without_diagnosis": no_diagnosis,
        "support": {
            name: {
                "images": int((truth_idx == c).sum()),
                "lesions": len({lesions[j] for j in np.flatnonzero(truth_idx == c)}),
            }
            for c, name in enumerate(class_names)
        },
        "metrics": {},
    }
    ways = [w for w in _WAYS if all(w in run for run in joined)]
    for way in ways:
        correct = np.stack([np.array([run[way][i].argmax() for i in ids]) == truth_idx for run in joined]).astype(
            float
        )  # (runs, images)
        unit_truth, unit_groups = truth_idx, lesions
        if per_lesion:
            correct = np.stack([np.bincount(unit_of, weights=c) for c in correct]) / np.bincount(unit_of)
            unit_truth, unit_groups = units[1], units[0]
        statistic = balanced_accuracy_statistic(correct, unit_truth, k)
        per_seed = [statistic([np.array([r])], np.arange(len(unit_truth))) for r in range(len(joined))]
        estimate, low, high = two_level_bootstrap(
            statistic,
            len(joined),
            unit_groups,
            strata=unit_truth,
            n_resamples=n_resamples,
            confidence_level=confidence_level,
        )
        sd = _mean_sd(per_seed)[1]
        report["metrics"][f"{way}/balanced_accuracy"] = {
            "per_seed": per_seed,
            "mean": estimate,
            "sd": sd,
            "interval": [low, high],
        }
        for c, name in enumerate(class_names):
            members = unit_truth == c
            recalls = [float(correct[r, members].mean()) if members.any() else math.nan for r in range(len(joined))]
            report["metrics"][f"{way}/recall/{name}"] = {"per_seed": recalls, "mean": float(np.mean(recalls))}
    if all("threshold_jaccard" in run for run in joined):
        masked = sorted(joined[0]["threshold_jaccard"])
        if source is not None:
            masked = [i for i in masked if sources.get(i) == source]
        task1 = [i for i in masked if sources.get(i, "").startswith("isic_task1")]
        for name, subset in (("threshold_jaccard", masked), ("task1_threshold_jaccard", task1)):
            if not subset:
                continue
            values = np.stack([[run["threshold_jaccard"][i] for i in subset] for run in joined])  # (runs, images)
            groups = [records[i].group if i in records else i for i in subset]

            def mean_jaccard(seed_draws, items, values=values):
                return float(np.mean([values[r, items].mean() for r in seed_draws[0]]))

            estimate, low, high = two_level_bootstrap(
                mean_jaccard, len(joined), groups, n_resamples=n_resamples, confidence_level=confidence_level
            )
            report["metrics"][name] = {
                "per_seed": [float(v.mean()) for v in values],
                "mean": estimate,
                "sd": _mean_sd(values.mean(axis=1))[1],
                "interval": [low, high],
                "num_images": len(subset),
            }
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / "crossval.json", json.dumps(report, indent=2))
        atomic_write(out_dir / "crossval.md", crossval_markdown(report, confidence_level))
    return report


def _fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"


def _cell(entry: dict[str, Any]) -> str:
    low, high = entry["interval"]
    seeds = " / ".join(_fmt(v) for v in entry["per_seed"])
    return f"**{_fmt(entry['mean'])}** [{_fmt(low)}, {_fmt(high)}] (seeds {seeds})"


def crossval_markdown(report: dict[str, Any], confidence_level: float = 0.95) -> str:
    """The report as markdown: headline figures, then each class's recall both ways with its support."""
    m = report["metrics"]
    level = f"{confidence_level:.0%}"
    lines = [
        f"# Cross-validation: {report['folds']} lesion-grouped folds, {report['runs']} training seed(s), "
        f"{report['num_images']} images scored once per seed",
        "",
        *(
            [
                f"({report['without_diagnosis']} scored images have no diagnosis in the manifest: masks only)",
                "",
            ]
            if report.get("without_diagnosis")
            else []
        ),
        *([f"Only the images of source `{report['source']}`.", ""] if report.get("source") else []),
        *(
            [
                f"Diagnosis counts each of the {report['num_lesions']} lesions once (its images' mean correctness: "
                "the expected score of one image per lesion).",
                "",
            ]
            if report.get("per_lesion")
            else []
        ),
        f"Seed mean [{level} two-level bootstrap interval: seeds, then lesions within their class] (each seed).",
        "",
        "| metric | value |",
        "| --- | --- |",
    ]
    names = {
        "with_metadata/balanced_accuracy": "balanced accuracy, with the metadata the data has",
        "image_only/balanced_accuracy": "balanced accuracy, image only (age, sex, site withheld)",
        "threshold_jaccard": "thresholded Jaccard, every image with a mask",
        "task1_threshold_jaccard": "thresholded Jaccard, ISIC 2018 Task 1 images",
    }
    for key, title in names.items():
        if key in m:
            extra = f" ({m[key]['num_images']} images)" if "num_images" in m[key] else ""
            lines.append(md_row(title + extra, _cell(m[key])))
    ways = [w for w in _WAYS if f"{w}/balanced_accuracy" in m]
    header = ["class", "images", "lesions", *(f"recall, {w.replace('_', ' ')}" for w in ways)]
    lines += ["", "Recall of each class (seed mean; each seed), next to its support:", "", md_row(*header)]
    lines.append(md_row("---", *["---:"] * (len(header) - 1)))
    for name in report["class_names"]:
        support = report["support"][name]
        cells = []
        for way in ways:
            entry = m[f"{way}/recall/{name}"]
            cells.append(f"{_fmt(entry['mean'])} ({' / '.join(_fmt(v) for v in entry['per_seed'])})")
        lines.append(md_row(name, support["images"], support["lesions"], *cells))
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinfusion crossval",
        description=(
            "Pool the validation folds of a lesion-grouped K-fold cross-validation (fit --data.cv_folds K, one run "
            "per fold; skinfusion evaluate --cv-folds K --cv-fold k of each) into one score of every lesion per "
            "training seed: balanced accuracy with and without the metadata, per-class recall with support, "
            "thresholded Jaccard, each with a two-level (seed, lesion) bootstrap interval. Writes crossval.json "
            "and crossval.md."
        ),
        epilog="Example: skinfusion crossval --truth cache/manifest.csv --run s0/fold0 s0/fold1 s0/fold2 "
        "--run s1/fold0 s1/fold1 s1/fold2 --out cv",
    )
    parser.add_argument("--truth", required=True, help="the manifest the folds were drawn from")
    parser.add_argument(
        "--run",
        action="append",
        nargs="+",
        required=True,
        metavar="FOLD_DIR",
        help="the K fold evaluation folders of one training seed (repeat --run for each seed)",
    )
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument(
        "--per-lesion",
        action="store_true",
        help="count every lesion once in the diagnosis metrics (its images' mean correctness), as a held-out check "
        "with one image per lesion does",
    )
    parser.add_argument(
        "--source", help="score only the images of this manifest source (e.g. isic_task3: HAM10000, with metadata)"
    )
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default: 0.95)")
    return parser


def crossval_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``skinfusion crossval``: pool fold evaluations (see the module docstring)."""
    args = build_parser().parse_args(argv)
    report = pool_crossval(
        args.truth,
        args.run,
        args.out,
        n_resamples=args.resamples,
        confidence_level=args.confidence,
        per_lesion=args.per_lesion,
        source=args.source,
    )
    sys.stdout.write(crossval_markdown(report, args.confidence))
    return report
