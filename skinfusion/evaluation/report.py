"""Evaluation report: the official ISIC metrics at the original resolution, tables, plots and a gallery.

:func:`evaluate` scores predictions against the truth that a set of records carries and writes::

    out_dir/
      metrics.json                 task1/* (Task 1 means) and task3/* (balanced accuracy, per-class and macro
                                   metrics) by skinfusion.evaluation.isic, plus the confusion matrix
      per_class.md                 a markdown table with one row per class
      per_image_segmentation.csv   Task 1 metrics of every image with a mask
      confusion_matrix.png         rows: truth, columns: prediction (counts; colour = row fraction)
      roc_curves.png               one-vs-rest ROC curve of every class present in the truth
      worst_segmentations/         the N lowest-Jaccard images: truth contour green, prediction magenta
      predictions/                 (when a Predictor is given) the masks and CSV that were scored
      image_only/                  (a Predictor whose network reads age/sex/site) the diagnosis CSV of the
                                   labelled images (the ones it scores) predicted with that metadata withheld,
                                   scored as task3_image_only/*: what `predict DIR` and the demo give for
                                   images without it (for unlabelled images, run `predict DIR`)

Records with a mask are scored for Task 1 (at the mask's own, original resolution), records with a label for
Task 3; the parts of a task that no record has truth for are left out.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from skinfusion.data.dataset import META_FIELDS
from skinfusion.data.records import Record
from skinfusion.data.split import assign_folds
from skinfusion.errors import DataError
from skinfusion.evaluation.isic import (
    SEGMENTATION_METRICS,
    classification_scores,
    mean_scores,
    read_classification_csv,
    read_segmentation_mask,
    roc_curve,
    segmentation_image_scores,
)
from skinfusion.evaluation.study import confusion_matrix, md_row, per_class_table
from skinfusion.inference.inputs import collect_records
from skinfusion.inference.overlay import render_overlay
from skinfusion.inference.predictor import Predictor, add_predictor_arguments, predictor_from_args
from skinfusion.inference.writers import CSV_NAME, MASKS_DIR, mask_filename, png_bytes
from skinfusion.io import atomic_write

log = logging.getLogger(__name__)

__all__ = ["evaluate", "evaluate_main", "score_predictions"]

_ARGMAX_COLUMNS = ("recall", "precision", "f1", "accuracy")
_PER_CLASS_COLUMNS = (
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("auc", "AUC"),
    ("auc_sens_80", "AUC (sens>80%)"),
    ("ap", "AP"),
    ("ppv", "PPV"),
    ("npv", "NPV"),
    ("dice", "F1"),
    ("accuracy", "accuracy"),
)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, np.generic):
        return _json_value(value.item())
    return value


def _prediction_files(predictions: str | Path) -> tuple[Path | None, Path | None]:
    """``(masks folder, CSV)`` of a prediction folder written by :meth:`Predictor.write` (or a bare mask folder)."""
    folder = Path(predictions)
    if not folder.is_dir():
        raise DataError(folder, "prediction folder not found")
    masks = folder / MASKS_DIR if (folder / MASKS_DIR).is_dir() else None
    if masks is None and any(p.name.endswith("_segmentation.png") for p in folder.iterdir()):
        masks = folder
    csv_path = folder / CSV_NAME if (folder / CSV_NAME).is_file() else None
    if masks is None and csv_path is None:
        raise DataError(folder, f"holds neither {MASKS_DIR}/ nor {CSV_NAME}")
    return masks, csv_path


def score_predictions(
    records: Sequence[Record], masks_dir: str | Path | None, csv_path: str | Path | None
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """Score predicted masks and a Task 3 CSV against the truth of ``records`` (with a ``mask`` and/or ``label``).

    Args:
        masks_dir: folder of ``<id>_segmentation.png`` predictions (needed when a record has a mask).
        csv_path: Task 3 CSV ``image,<class>...`` (needed when a record has a label); its class columns are
            the classes scored.

    Returns:
        ``(metrics, per-image Task 1 rows, classification data)``: ``metrics`` is flat (``task1/<metric>``,
        ``task1/num_images``, ``task3/<key>`` of :func:`~skinfusion.evaluation.isic.classification_scores`,
        ``task3/num_images``); a per-image row is ``{"id", "image", "mask", <metric>...}``; the classification
        data is ``{"class_names", "truth" (N,), "probabilities" (N,K)}`` or ``None``.

    Raises:
        DataError: a missing prediction, a predicted mask whose size differs from the truth, or a
            label that is not one of the CSV's classes.
    """
    metrics: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    with_mask = [r for r in records if r.mask]
    if with_mask:
        from skinfusion.data.imageio import read_mask

        if masks_dir is None:
            raise DataError(None, f"{len(with_mask)} records have masks but no predicted masks were given")
        for record in with_mask:
            pred_path = Path(masks_dir) / mask_filename(record.id)
            if not pred_path.is_file():
                raise DataError(pred_path, f"no predicted mask for {record.id}")
            truth = read_mask(record.mask).astype(bool)
            scores = segmentation_image_scores(read_segmentation_mask(pred_path), truth, image_id=record.id)
            rows.append({"id": record.id, "image": str(record.image), "mask": str(pred_path), **scores})
        metrics.update({f"task1/{k}": v for k, v in mean_scores(rows).items()})

    labelled = [r for r in records if r.label]
    classification = None
    if labelled:
        if csv_path is None:
            raise DataError(None, f"{len(labelled)} records have labels but no prediction CSV was given")
        import pandas as pd

        class_names = [str(c) for c in pd.read_csv(csv_path, nrows=0).columns if c != "image"]
        ids, probabilities = read_classification_csv(csv_path, class_names)
        row_of = {image_id: i for i, image_id in enumerate(ids)}
        missing = [r.id for r in labelled if r.id not in row_of]
        if missing:
            raise DataError(csv_path, f"no prediction for labelled images {missing[:10]}")
        unknown = sorted({r.label for r in labelled} - set(class_names))
        if unknown:
            raise DataError(csv_path, f"labels {unknown} are not among the CSV's classes {class_names}")
        truth = np.array([class_names.index(r.label) for r in labelled])
        probabilities = probabilities[[row_of[r.id] for r in labelled]]
        scores = classification_scores(probabilities, truth, class_names)
        metrics.update({f"task3/{k}": v for k, v in scores.items()})
        metrics["task3/num_images"] = len(labelled)
        classification = {"class_names": class_names, "truth": truth, "probabilities": probabilities}
    if not with_mask and not labelled:
        raise DataError(None, "no record has a mask or a label: nothing to evaluate")
    return metrics, rows, classification


def _fmt(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def _per_class_markdown(
    metrics: dict[str, Any], classification: dict[str, Any] | None, image_only: dict[str, Any] | None = None
) -> str:
    lines = ["# Evaluation report", ""]
    if "task1/num_images" in metrics:
        lines += [
            f"## Task 1 — lesion segmentation ({metrics['task1/num_images']} images, original resolution)",
            "",
            "| metric | mean |",
            "| --- | --- |",
            *(md_row(name, _fmt(metrics[f"task1/{name}"])) for name in SEGMENTATION_METRICS),
            "",
            "`threshold_jaccard` (Jaccard, 0 below 0.65) is the ISIC 2018 Task 1 ranking metric.",
            "",
        ]
    if classification is not None:
        names = classification["class_names"]
        support = np.bincount(classification["truth"], minlength=len(names))
        lines += [
            f"## Task 3 — diagnosis ({metrics['task3/num_images']} images)",
            "",
            f"Balanced multi-class accuracy (ISIC 2018 Task 3 ranking metric): "
            f"**{_fmt(metrics['task3/balanced_accuracy'])}**",
            "",
            "### Argmax predictions (the confusion matrix; the mean recall is the balanced accuracy)",
            "",
            "| class | support | recall | precision | F1 | accuracy (one-vs-rest) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            *(
                md_row(name, support[i], *[_fmt(metrics.get(f"task3/argmax/{key}/{name}")) for key in _ARGMAX_COLUMNS])
                for i, name in enumerate(names)
            ),
            "",
            "Each image counts for its most probable class; n/a: the class is absent from the truth.",
            "",
            "### Thresholded one-vs-rest (the official scorer's per-class metrics)",
            "",
            md_row("class", "support", *[title for _, title in _PER_CLASS_COLUMNS]),
            md_row("---", *["---:"] * (1 + len(_PER_CLASS_COLUMNS))),
            *(
                md_row(name, support[i], *[_fmt(metrics.get(f"task3/{key}/{name}")) for key, _ in _PER_CLASS_COLUMNS])
                for i, name in enumerate(names)
            ),
            md_row("macro", support.sum(), *[_fmt(metrics.get(f"task3/macro/{key}")) for key, _ in _PER_CLASS_COLUMNS]),
            "",
            "One-vs-rest, a probability > 0.5 counting as positive (the official scorer's rule), so a class "
            "can be the argmax without being positive here: these sensitivities are not the argmax recall above. "
            "n/a: the class is absent from the truth.",
            "",
        ]
    if image_only is not None:
        names = image_only["class_names"]
        support = np.bincount(image_only["truth"], minlength=len(names))
        lines += [
            f"## Task 3 — diagnosis from the image alone ({metrics['task3_image_only/num_images']} images; "
            f"age, sex and site withheld from the {metrics['task3/num_with_metadata']} that have them)",
            "",
            "What `skinfusion predict DIR` and the demo give for images without clinical metadata. Balanced "
            f"accuracy: **{_fmt(metrics['task3_image_only/balanced_accuracy'])}** "
            f"(with the metadata: {_fmt(metrics['task3/balanced_accuracy'])})",
            "",
            "| class | support | recall (image only) | recall (with metadata) | precision (image only) |",
            "| --- | ---: | ---: | ---: | ---: |",
            *(
                md_row(
                    name,
                    support[i],
                    _fmt(metrics.get(f"task3_image_only/argmax/recall/{name}")),
                    _fmt(metrics.get(f"task3/argmax/recall/{name}")),
                    _fmt(metrics.get(f"task3_image_only/argmax/precision/{name}")),
                )
                for i, name in enumerate(names)
            ),
            "",
        ]
    return "\n".join(lines)


def _figure_bytes(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_confusion_matrix(matrix: np.ndarray, class_names: Sequence[str]) -> bytes:
    """PNG of a confusion matrix: counts written in the cells, colour = fraction of the true class."""
    from matplotlib.figure import Figure

    rows = matrix.sum(axis=1, keepdims=True)
    fraction = np.divide(matrix, rows, out=np.zeros(matrix.shape, float), where=rows > 0)
    k = len(class_names)
    figure = Figure(figsize=(1.0 + 0.7 * k, 0.8 + 0.7 * k))
    axes = figure.add_subplot()
    image = axes.imshow(fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    axes.set_xticks(range(k), class_names, rotation=45, ha="right")
    axes.set_yticks(range(k), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            axes.text(
                j, i, str(matrix[i, j]), ha="center", va="center", color="white" if fraction[i, j] > 0.5 else "black"
            )
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of true class")
    return _figure_bytes(figure)


def plot_roc_curves(truth: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str], metrics: dict) -> bytes:
    """PNG of the one-vs-rest ROC curve of every class present (and absent) in the truth."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.0, 5.5))
    axes = figure.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
    for index, name in enumerate(class_names):
        positives = truth == index
        if positives.all() or not positives.any():
            axes.plot([], [], label=f"{name} (not scorable: one class only)")
            continue
        fpr, tpr, _ = roc_curve(positives, probabilities[:, index])
        auc = metrics.get(f"task3/auc/{name}")
        axes.plot(fpr, tpr, label=f"{name} (AUC {_fmt(auc)})")
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.01)
    axes.set_xlabel("false positive rate (1 - specificity)")
    axes.set_ylabel("true positive rate (sensitivity)")
    axes.set_title("ROC curves, one class vs rest")
    axes.legend(loc="lower right", fontsize=8)
    return _figure_bytes(figure)


def write_worst_gallery(
    rows: Sequence[dict[str, Any]], records: Sequence[Record], out_dir: str | Path, n: int = 8, max_side: int = 512
) -> list[Path]:
    """Write overlays of the ``n`` lowest-Jaccard images: truth contour green, prediction magenta.

    Files are named ``<rank>_<id>.png`` (rank 01 is the worst) with the Jaccard in the text strip.
    """
    from skinfusion.data.imageio import read_image, read_mask

    by_id = {r.id: r for r in records}
    worst = sorted(rows, key=lambda row: (row["jaccard"], row["id"]))[:n]
    written = []
    for rank, row in enumerate(worst, start=1):
        record = by_id[row["id"]]
        image = read_image(record.image, max_side=max_side)
        if max(image.shape[:2]) < max_side // 2:  # enlarge tiny images so the contours stay readable
            scale = (max_side // 2) / max(image.shape[:2])
            size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
            image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        truth = read_mask(record.mask).astype(bool)
        pred = read_segmentation_mask(row["mask"]) > 128
        lines = [f"{row['id']} Jaccard {row['jaccard']:.3f}", "green truth, magenta prediction"]
        overlay = render_overlay(
            image, mask=pred, extra_mask=truth, extra_color=(0, 255, 0), contour_color=(255, 0, 255), lines=lines
        )
        path = Path(out_dir) / f"{rank:02d}_{row['id']}.png"
        atomic_write(path, png_bytes(overlay))
        written.append(path)
    return written


def evaluate(
    predictions: Predictor | str | Path,
    truth: str | Path | Record | Sequence[str | Path | Record],
    out_dir: str | Path,
    worst: int = 8,
    subset: str | None = None,
    split: str | None = None,
    explain: Sequence[str] | None = None,
    cv: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """Score predictions against the truth and write an evaluation report folder (see the module docstring).

    Args:
        predictions: a :class:`~skinfusion.inference.predictor.Predictor` (it predicts the truth's images into
            ``out_dir/predictions``, which are then scored), or a folder written by :meth:`Predictor.write`.
        truth: what :func:`~skinfusion.inference.inputs.collect_records` accepts: a manifest CSV (a prepared
            one is read at the original resolution), an ISIC 2018 layout folder, or records.
        worst: number of images in ``worst_segmentations/`` (0: none).
        subset: ISIC subset when a layout folder holds several.
        split: keep only records whose ``meta["split"]`` is this; ``None`` or ``"all"``: every record
            (``skinfusion evaluate`` without ``--split`` passes ``"test"`` when the truth has a split column).
        explain: also measure whether the maps look at the lesion (needs a Predictor): ``attention`` and/or
            ``gradcam``/``gradcam++``, against a uniform map: ``explain.md``, ``explain/*.png`` and
            ``explain/<map>/{mass_inside,pointing_game}`` in ``metrics.json``.
        cv: ``(folds, fold, seed)``: score only the validation fold ``fold`` of the lesion-grouped
            cross-validation that ``fit --data.cv_folds folds --data.cv_fold fold --data.cv_seed seed`` trained
            with (the same :func:`~skinfusion.data.split.assign_folds` of the train and val rows); instead of
            ``split``.

    Returns:
        The metrics written to ``metrics.json``. With a Predictor whose network reads clinical metadata, the
        diagnosis is scored twice: ``task3/*`` with the metadata the truth has, ``task3_image_only/*`` with
        age, sex and site withheld (what ``predict DIR`` and the demo see).

    Raises:
        DataError: see :func:`score_predictions`; or no record is left after ``split``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = collect_records(truth, subset=subset)
    if cv is not None:
        records = cv_fold_records(records, *cv)
    elif split not in (None, "all"):
        records = [r for r in records if r.meta.get("split") == split]
        if not records:
            raise DataError(None, f"no record in split {split!r} (--split all: every record)")
    records = [r for r in records if r.mask or r.label]
    if explain and not isinstance(predictions, Predictor):
        raise ValueError("explain needs a model to explain (--ckpt), not a folder of predictions")
    focus: dict[str, dict[str, float]] = {}
    if isinstance(predictions, Predictor):
        scored = records
        if getattr(predictions.net, "decoder", True) is None:
            log.info("the network has no decoder: scoring its diagnosis only")
            scored = [dataclasses.replace(r, mask=None) for r in records if r.label]
        stream = predictions.predict_records(scored)
        heats: dict[str, dict[str, np.ndarray]] = {}
        if explain:  # the pass that writes the predictions also keeps the first method's maps for the focus
            run = copy.copy(predictions)
            run.explain = next((m for m in explain if m != "attention"), None)
            with_mask = {r.id for r in records if r.mask is not None}
            stream = (_keep_maps(p, heats, with_mask, explain) for p in run.predict_records(scored))
        predictions.write(stream, out_dir / "predictions", masks=True, csv=True)
        if explain:
            focus = _lesion_focus(predictions, records, explain, out_dir, heats)
        blind = _image_only_predictions(predictions, scored, out_dir / IMAGE_ONLY_DIR)
        records, predictions = scored, out_dir / "predictions"
    else:  # a folder of predictions: its image-only CSV too, when it has one
        blind = Path(predictions) / IMAGE_ONLY_DIR / CSV_NAME
        blind = blind if blind.is_file() else None
    masks_dir, csv_path = _prediction_files(predictions)
    metrics, rows, classification = score_predictions(records, masks_dir, csv_path)
    blind_classification = None
    if blind is not None and classification is not None:
        blind_metrics, _, blind_classification = score_predictions(
            [dataclasses.replace(r, mask=None) for r in records if r.label], None, blind
        )
        metrics.update({f"task3_image_only/{k[len('task3/') :]}": v for k, v in blind_metrics.items()})
        metrics["task3/num_with_metadata"] = sum(1 for r in records if r.label and _has_clinical_metadata(r))

    if classification is not None:
        table = per_class_table(classification["truth"], classification["probabilities"], classification["class_names"])
        for name, row in table.items():
            metrics.update({f"task3/argmax/{key}/{name}": row[key] for key in _ARGMAX_COLUMNS})
    if blind_classification is not None:
        table = per_class_table(
            blind_classification["truth"], blind_classification["probabilities"], blind_classification["class_names"]
        )
        for name, row in table.items():
            metrics.update({f"task3_image_only/argmax/{key}/{name}": row[key] for key in _ARGMAX_COLUMNS})
    if explain:
        for name, row in focus.items():
            metrics.update({f"explain/{name}/{key}": row[key] for key in ("mass_inside", "pointing_game")})
    report = {k: _json_value(v) for k, v in metrics.items()}
    if cv is not None:  # skinfusion crossval pools the folds by it
        report["cv"] = {"folds": cv[0], "fold": cv[1], "seed": cv[2]}
    if classification is not None:
        matrix = confusion_matrix(classification["truth"], classification["probabilities"])
        report["confusion_matrix"] = {"class_names": classification["class_names"], "counts": matrix.tolist()}
    atomic_write(out_dir / "metrics.json", json.dumps(report, indent=2))
    atomic_write(out_dir / "per_class.md", _per_class_markdown(metrics, classification, blind_classification))
    if rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=["id", *SEGMENTATION_METRICS], extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(out_dir / "per_image_segmentation.csv", buffer.getvalue())
        if worst > 0:
            write_worst_gallery(rows, records, out_dir / "worst_segmentations", n=worst)
    if classification is not None:
        names = classification["class_names"]
        atomic_write(out_dir / "confusion_matrix.png", plot_confusion_matrix(matrix, names))
        atomic_write(
            out_dir / "roc_curves.png",
            plot_roc_curves(classification["truth"], classification["probabilities"], names, metrics),
        )
    return report


def _keep_maps(prediction: Any, heats: dict, ids: set[str], methods: Sequence[str]) -> Any:
    """Keep ``prediction``'s focus maps (when its id is in ``ids``) and pass it on without its heat map, which
    ``evaluate`` does not write as a file."""
    from skinfusion.inference.explain import focus_maps

    if prediction.id in ids:
        heats[prediction.id] = focus_maps(prediction, methods)
    return dataclasses.replace(prediction, heat=None, explain_method=None)


def _lesion_focus(
    predictor: Predictor, records: Sequence[Record], methods: Sequence[str], out_dir: Path, heats: dict
) -> dict[str, dict[str, float]]:
    """Measure and write the lesion focus of the maps (``explain.md``, example overlays in ``explain/``)."""
    from skinfusion.inference.explain import measure_lesion_focus

    table, overlays = measure_lesion_focus(predictor, records, methods, heats=heats)
    uniform = table.get("uniform", {})
    lines = [
        "# Do the maps look at the lesion?",
        "",
        f"{uniform.get('images', 0)} images with a true mask, each map compared at the network's input size "
        f"({predictor.image_size} px). *Mass inside*: the share of the map's mass inside the true lesion; "
        "*pointing game*: how often the map's maximum lies inside it. The uniform map (looking everywhere) "
        "scores the lesion's share of the image on both: a map does better than chance only above that row.",
        "",
        "| map | mass inside | pointing game |",
        "| --- | ---: | ---: |",
    ]
    for name, row in sorted(table.items(), key=lambda item: (item[0] == "uniform", item[0])):
        lines.append(f"| {name} | {row['mass_inside']:.3f} | {row['pointing_game']:.3f} |")
    atomic_write(out_dir / "explain.md", "\n".join(lines) + "\n")
    for index, overlay in enumerate(overlays):
        atomic_write(out_dir / "explain" / f"example_{index}.png", png_bytes(overlay))
    return table


#: Folder of an evaluation's (or a predictions folder's) image-only diagnosis CSV: metadata withheld.
IMAGE_ONLY_DIR = "image_only"


def _has_clinical_metadata(record: Record) -> bool:
    return any(str(record.meta.get(field, "") or "").strip() for field in META_FIELDS)


def withhold_metadata(record: Record) -> Record:
    """``record`` with age, sex and site withheld and no mask: what ``predict DIR`` sees of it, for the diagnosis."""
    return dataclasses.replace(record, mask=None, meta={k: v for k, v in record.meta.items() if k not in META_FIELDS})


def _image_only_predictions(predictor: Predictor, records: Sequence[Record], out_dir: Path) -> Path | None:
    """Predict the diagnosis of the labelled ``records`` with age, sex and site withheld into ``out_dir``'s CSV;
    ``None`` when the network has no metadata branch (its diagnosis is image-only already) or no record has
    metadata to withhold (both ways would be the same)."""
    labelled = [r for r in records if r.label]
    if not predictor.meta_dim or not any(_has_clinical_metadata(r) for r in labelled):
        return None
    blind = [withhold_metadata(r) for r in labelled]
    run = copy.copy(predictor)
    run.explain = None
    log.info("scoring the diagnosis again with age, sex and site withheld (%d images)", len(blind))
    run.write(run.predict_records(blind), out_dir, masks=False, csv=True)
    return out_dir / CSV_NAME


def cv_fold_records(records: Sequence[Record], folds: int, fold: int, seed: int = 0) -> list[Record]:
    """The validation fold ``fold`` of ``fit --data.cv_folds folds --data.cv_seed seed``: the same lesion-grouped
    folds of the records whose split is train or val (the test split is never in a fold).

    Raises:
        DataError: the records carry no train/val split (a manifest written by ``skinfusion prepare`` does).
        ValueError: ``folds`` below 2 or ``fold`` out of range.
    """
    if not 0 <= fold < folds:
        raise ValueError(f"cv fold must be in [0, {folds}), got {fold}")
    pool = [r for r in records if r.meta.get("split") in ("train", "val")]
    if not pool:
        raise DataError(None, "cross-validation folds need a manifest with train/val splits (skinfusion prepare)")
    assigned = assign_folds(pool, folds, seed)
    return [r for r in pool if assigned[r.id] == fold]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinfusion evaluate",
        description=(
            "Score predictions with the official ISIC 2018 metrics (original resolution) and write a report folder: "
            "metrics.json, per_class.md, confusion_matrix.png, roc_curves.png, worst_segmentations/."
        ),
        epilog=(
            "Either --predictions DIR (written by skinfusion predict) or --ckpt CKPT (predict first). Example: "
            "skinfusion evaluate --ckpt best.ckpt --truth data/manifest.csv --split test --out report"
        ),
    )
    parser.add_argument("--truth", required=True, help="manifest CSV or ISIC 2018 layout folder with masks/labels")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--predictions", default=None, help="prediction folder (masks/, predictions.csv) to score")
    parser.add_argument("--subset", default=None, help="ISIC subset when the truth folder holds several")
    parser.add_argument(
        "--split",
        choices=("train", "val", "test", "all"),
        default=None,
        help="only this manifest split; all: every image (default: test when the truth has a split column, "
        "otherwise all)",
    )
    parser.add_argument(
        "--cv-folds",
        type=int,
        default=0,
        metavar="K",
        help="score the validation fold --cv-fold of a K-fold cross-validation (fit --data.cv_folds K): the same "
        "lesion-grouped folds of the train and val rows; instead of --split",
    )
    parser.add_argument("--cv-fold", type=int, default=0, metavar="k", help="the fold, 0 .. K-1 (default: 0)")
    parser.add_argument("--cv-seed", type=int, default=0, help="seed of the folds (fit's data.cv_seed; default: 0)")
    parser.add_argument("--worst", type=int, default=8, help="images in the worst-segmentation gallery (default: 8)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--explain",
        nargs="*",
        choices=("attention", "gradcam", "gradcam++"),
        default=None,
        metavar="METHOD",
        help="also measure whether the maps look at the true lesion (explain.md): attention (every attention map), "
        "gradcam, gradcam++; --explain alone: attention and gradcam",
    )
    add_predictor_arguments(parser)
    for action in parser._actions:  # --ckpt is needed only without --predictions
        if action.dest == "ckpt":
            action.required = False
    return parser


def evaluate_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``skinfusion evaluate``: score a prediction folder, or a checkpoint's predictions, and write a report."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.predictions is None) == (args.ckpt is None):
        parser.error("give exactly one of --predictions and --ckpt")
    source = predictor_from_args(args) if args.ckpt else args.predictions
    explain = None if args.explain is None else (args.explain or ["attention", "gradcam"])
    if explain and args.ckpt is None:
        parser.error("--explain needs --ckpt (a model to explain)")
    if explain and "attention" in explain and not getattr(source.net, "config", {}).get("attention"):
        explain = [m for m in explain if m != "attention"]  # a network without attention: Grad-CAM only
        if not explain:
            parser.error("--explain attention: this network has no attention map; use gradcam")
    cv = None
    if args.cv_folds:
        if args.split is not None:
            parser.error("give --split or --cv-folds, not both")
        if args.cv_folds < 2 or not 0 <= args.cv_fold < args.cv_folds:
            parser.error(f"--cv-folds must be >= 2 and --cv-fold in [0, {args.cv_folds}), got {args.cv_fold}")
        cv = (args.cv_folds, args.cv_fold, args.cv_seed)
    split = args.split
    if cv is not None:
        split = f"cv fold {args.cv_fold} of {args.cv_folds}"
        print(f"skinfusion evaluate: scoring validation fold {args.cv_fold} of {args.cv_folds}", file=sys.stderr)
    elif split is None:  # a manifest with a split column: its test split (never the training images)
        has_split = any(r.meta.get("split") for r in collect_records(args.truth, subset=args.subset))
        split = "test" if has_split else "all"
        what = "the test split (--split all: every split)" if has_split else "every image (the truth has no split)"
        print(f"skinfusion evaluate: scoring {what}", file=sys.stderr)
    report = evaluate(
        source,
        args.truth,
        args.out,
        worst=args.worst,
        subset=args.subset,
        split=None if cv else split,
        explain=explain,
        cv=cv,
    )
    keys = ("task1/threshold_jaccard", "task3/balanced_accuracy", "task3_image_only/balanced_accuracy")
    headline = {k: v for k, v in report.items() if k in keys}
    print(json.dumps({"out": str(args.out), "split": split, **headline}, indent=2))
    return report
