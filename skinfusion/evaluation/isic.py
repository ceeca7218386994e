"""ISIC challenge metrics, computed exactly as the official ``isic-challenge-scoring`` package (5.6), numpy only.

Task 1 (lesion segmentation) is scored per image, at the original resolution, and ranked by the *thresholded*
Jaccard index (0 below 0.65) averaged over images. Task 3 (diagnosis) is ranked by the balanced multi-class
accuracy (mean per-class recall); per class the scorer also reports one-vs-rest accuracy, sensitivity,
specificity, Dice, PPV, NPV, ROC AUC, partial ROC AUC above 80% sensitivity and average precision.

The official conventions, edge cases included:

* An 8-bit mask is foreground where ``value > 128``; a ``bool`` mask is taken as is.
* A zero denominator scores a "freebie" 1.0 (sensitivity without true positives, specificity without true
  negatives, Jaccard and Dice when both masks are empty, PPV / NPV when nothing is predicted positive /
  negative): an empty prediction scores 1 everywhere on an empty truth, and Jaccard 0 on a non-empty one.
* Classification labels come from the highest probability; a row whose maximum is tied is "undecided": as a
  prediction always wrong, as a truth left out of the balanced accuracy.
* A class absent from the truth is left out of the balanced accuracy; its ROC AUC and partial AUC are NaN
  (scikit-learn >= 1.6), its average precision 0, and macro averages skip NaN. (The official package crashes
  on such a class.)
* Weights follow the truth CSV's ``score_weight`` column; image ``ISIC_0035068`` gets weight 0, as in the
  official truth reader.

Reference: N. Codella et al., "Skin Lesion Analysis Toward Melanoma Detection 2018", arXiv:1902.03368.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from skinfusion.data.records import ISIC_CLASSES
from skinfusion.errors import DataError

#: Jaccard below this scores 0 in the Task 1 ranking metric.
JACCARD_THRESHOLD = 0.65
#: Task 1 metrics, in the official scorer's order.
SEGMENTATION_METRICS = ("accuracy", "sensitivity", "specificity", "jaccard", "threshold_jaccard", "dice")
#: Task 3 per-class metrics, in the official scorer's order.
CLASSIFICATION_METRICS = ("accuracy", "sensitivity", "specificity", "dice", "ppv", "npv", "auc", "auc_sens_80", "ap")
#: File-name suffix of ISIC Task 1 masks.
SEGMENTATION_SUFFIX = "_segmentation.png"
#: Images the official truth reader gives weight 0 (a known bad ground-truth image).
ZERO_WEIGHT_IMAGES: frozenset[str] = frozenset({"ISIC_0035068"})

_ISIC_ID = re.compile(r"ISIC_[0-9]{7}")
# numpy >= 2 renamed trapz; keep numpy 1.24+ working
_trapezoid = getattr(np, "trapezoid", None) or np.trapz


# ---------------------------------------------------------------------------------------------- Binary confusion counts


@dataclass(frozen=True)
class BinaryConfusion:
    """Binary confusion counts (weighted sums when built with weights), with the official metrics."""

    tp: float
    tn: float
    fp: float
    fn: float

    @classmethod
    def from_binary(
        cls, prediction: np.ndarray, truth: np.ndarray, weights: np.ndarray | None = None
    ) -> BinaryConfusion:
        """Counts from two boolean arrays of one shape (optionally weighted per element)."""
        prediction = np.asarray(prediction, dtype=bool).ravel()
        truth = np.asarray(truth, dtype=bool).ravel()
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction has {prediction.size} elements but truth has {truth.size}")
        if weights is None:
            tp = int(np.count_nonzero(truth & prediction))
            fp = int(np.count_nonzero(~truth & prediction))
            fn = int(np.count_nonzero(truth & ~prediction))
            return cls(tp=tp, tn=truth.size - tp - fp - fn, fp=fp, fn=fn)
        weights = np.asarray(weights, dtype=np.float64).ravel()
        if weights.shape != truth.shape:
            raise ValueError(f"weights have {weights.size} elements but truth has {truth.size}")
        return cls(
            tp=float(weights[truth & prediction].sum()),
            tn=float(weights[~truth & ~prediction].sum()),
            fp=float(weights[~truth & prediction].sum()),
            fn=float(weights[truth & ~prediction].sum()),
        )

    @property
    def accuracy(self) -> float:
        """(TP+TN) / all; NaN when the total (weight) is 0."""
        total = self.tp + self.tn + self.fp + self.fn
        return (self.tp + self.tn) / total if total else math.nan

    @property
    def sensitivity(self) -> float:
        """TP / (TP+FN); 1.0 when there are no positives in the truth."""
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0

    @property
    def specificity(self) -> float:
        """TN / (TN+FP); 1.0 when there are no negatives in the truth."""
        return self.tn / (self.tn + self.fp) if self.tn + self.fp else 1.0

    @property
    def jaccard(self) -> float:
        """TP / (TP+FP+FN); 1.0 when truth and prediction are both empty."""
        union = self.tp + self.fp + self.fn
        return self.tp / union if union else 1.0

    def threshold_jaccard(self, threshold: float = JACCARD_THRESHOLD) -> float:
        """The Jaccard index, or 0.0 when it is below ``threshold``."""
        jaccard = self.jaccard
        return jaccard if jaccard >= threshold else 0.0

    @property
    def dice(self) -> float:
        """2TP / (2TP+FP+FN); 1.0 when truth and prediction are both empty."""
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else 1.0

    @property
    def ppv(self) -> float:
        """Precision TP / (TP+FP); 1.0 when nothing is predicted positive."""
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def npv(self) -> float:
        """TN / (TN+FN); 1.0 when nothing is predicted negative."""
        return self.tn / (self.tn + self.fn) if self.tn + self.fn else 1.0


# ------------------------------------------------------------------------------------------------- Task 1: segmentation


def as_binary_mask(mask: np.ndarray, name: str = "mask") -> np.ndarray:
    """An HxW mask as a boolean array: ``bool`` as is, integer foreground where ``value > 128`` (the official rule).

    So {0,255} and {0,1}-as-uint8 masks differ: pass {0,1} masks as ``bool``.

    Raises:
        ValueError: if the mask is not 2-D, is empty, or is of a float/other dtype (threshold it first).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (H,W) array, got shape {mask.shape}")
    if mask.size == 0:
        raise ValueError(f"{name} is empty (shape {mask.shape})")
    if mask.dtype == bool:
        return mask
    if np.issubdtype(mask.dtype, np.integer):
        return mask > 128
    raise ValueError(f"{name} must be bool or 8-bit integer {{0,255}}, got dtype {mask.dtype}; threshold it first")


def _check_sizes(pred: np.ndarray, truth: np.ndarray, where: Any, truth_name: str = "the ground truth") -> None:
    if pred.shape != truth.shape:
        raise DataError(
            where,
            f"predicted mask is {pred.shape[1]}x{pred.shape[0]} (WxH) but {truth_name} is "
            f"{truth.shape[1]}x{truth.shape[0]}; predict at the original image size",
        )


def segmentation_image_scores(pred_mask: np.ndarray, true_mask: np.ndarray, image_id: str = "") -> dict[str, float]:
    """Task 1 metrics (:data:`SEGMENTATION_METRICS`) of one image, from HxW masks at the original size.

    Raises:
        DataError: if the two masks differ in size (``image_id`` names the image).
    """
    pred = as_binary_mask(pred_mask, f"prediction {image_id}".strip())
    truth = as_binary_mask(true_mask, f"ground truth {image_id}".strip())
    _check_sizes(pred, truth, image_id or None)
    cm = BinaryConfusion.from_binary(pred, truth)
    return {
        name: cm.threshold_jaccard() if name == "threshold_jaccard" else getattr(cm, name)
        for name in SEGMENTATION_METRICS
    }


def mean_scores(rows: Iterable[dict[str, float]], names: Sequence[str] = SEGMENTATION_METRICS) -> dict[str, Any]:
    """The official "macro average" of per-image scores: every image weighs the same; adds ``num_images``."""
    rows = list(rows)
    if not rows:
        raise ValueError("no images to score")
    return {**{name: float(np.mean([row[name] for row in rows])) for name in names}, "num_images": len(rows)}


def segmentation_scores(pred_masks: Iterable[np.ndarray], true_masks: Iterable[np.ndarray]) -> dict[str, float]:
    """Task 1 metrics of each image at its own resolution, averaged over images, and ``num_images``.

    The iterables (HxW masks, bool or 8-bit) are consumed lazily, so full-resolution masks can be streamed.

    Raises:
        ValueError: if the iterables differ in length or are empty.
        DataError: if a pair differs in size.
    """

    def rows() -> Iterator[dict[str, float]]:
        try:
            for index, (pred, truth) in enumerate(zip(pred_masks, true_masks, strict=True)):
                yield segmentation_image_scores(pred, truth, image_id=f"image #{index}")
        except ValueError as error:
            if "zip()" in str(error):
                raise ValueError("pred_masks and true_masks differ in length") from error
            raise

    return mean_scores(rows())


def read_segmentation_mask(path: str | Path) -> np.ndarray:
    """Read a mask PNG as the official scorer does: 8-bit greyscale (or 1-bit), as a uint8 HxW array.

    Raises:
        DataError: if the file cannot be decoded or is not single-channel.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "1":
                image = image.convert("L")
            if image.mode != "L":
                raise DataError(path, f"mask must be single-channel 8-bit greyscale (mode L), got mode {image.mode}")
            return np.asarray(image)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(path, f"cannot decode mask image ({error})") from error


def _prediction_index(pred_dir: Path) -> dict[str, list[Path]]:
    # The official scorer matches a prediction to an image when the image's 7-digit number occurs
    # in the prediction's file stem; indexing every 7-digit window gives the same matches in one pass.
    index: dict[str, list[Path]] = {}
    for path in sorted(pred_dir.iterdir()):
        if not path.is_file():
            continue
        stem = path.stem
        windows = {stem[i : i + 7] for i in range(len(stem) - 6) if stem[i : i + 7].isdigit()}
        for window in windows:
            index.setdefault(window, []).append(path)
    return index


def iter_segmentation_pairs(
    pred_dir: str | Path, truth_dir: str | Path
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield ``(image_id, predicted mask, true mask)`` (uint8) for every ground-truth mask, in name order.

    Ground-truth files are the PNGs of ``truth_dir`` whose name holds an ISIC id; other files are skipped. The
    prediction of ``ISIC_0012345`` is the one file of ``pred_dir`` whose stem contains ``0012345`` (the
    official rule).

    Raises:
        DataError: if a folder is missing, a prediction is missing or ambiguous, a mask cannot be read, or a
            prediction's size differs from its ground truth's.
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for folder in (pred_dir, truth_dir):
        if not folder.is_dir():
            raise DataError(folder, "not a directory")
    truth_files = [
        path
        for path in sorted(truth_dir.iterdir())
        if path.is_file() and path.suffix.lower() == ".png" and _ISIC_ID.search(path.stem)
    ]
    if not truth_files:
        raise DataError(truth_dir, f"no ground-truth masks (ISIC_xxxxxxx{SEGMENTATION_SUFFIX}) found")
    index = _prediction_index(pred_dir)
    for truth_file in truth_files:
        image_id = _ISIC_ID.search(truth_file.stem).group(0)
        candidates = index.get(image_id.split("_")[1], [])
        if not candidates:
            raise DataError(pred_dir, f"no predicted mask for {image_id} (expected {image_id}{SEGMENTATION_SUFFIX})")
        if len(candidates) > 1:
            names = ", ".join(path.name for path in candidates)
            raise DataError(pred_dir, f"several predicted masks match {image_id}: {names}")
        truth = read_segmentation_mask(truth_file)
        pred = read_segmentation_mask(candidates[0])
        _check_sizes(pred, truth, candidates[0], f"the ground truth {truth_file.name}")
        yield image_id, pred, truth


def score_segmentation_folders(pred_dir: str | Path, truth_dir: str | Path) -> dict[str, float]:
    """Score a folder of predicted Task 1 masks (matched by :func:`iter_segmentation_pairs`) as
    :func:`segmentation_scores`; predictions without a ground truth are ignored, as by the official scorer."""
    pairs = iter_segmentation_pairs(pred_dir, truth_dir)
    return mean_scores(segmentation_image_scores(pred, truth, image_id) for image_id, pred, truth in pairs)


# -------------------- Task 3: ranking curves (numpy ports of the scikit-learn functions that the official scorer calls)


def _binary_inputs(
    truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = np.asarray(truth, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    weights = np.ones_like(truth) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if not truth.shape == scores.shape == weights.shape:
        raise ValueError(f"truth, scores and weights differ in length: {truth.size}, {scores.size}, {weights.size}")
    if not np.isin(truth, (0.0, 1.0)).all():
        raise ValueError("binary truth must hold only 0 and 1")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    if (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError("weights must be finite and non-negative")
    return truth, scores, weights


def _threshold_counts(
    truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False/true positive (weight) sums at each distinct score, highest first (sklearn's curve core)."""
    truth, scores, weights = _binary_inputs(truth, scores, weights)
    keep = weights != 0
    if not keep.any():
        raise ValueError("all weights are zero")
    truth, scores, weights = truth[keep], scores[keep], weights[keep]
    order = np.argsort(-scores, kind="stable")
    scores, truth, weights = scores[order], truth[order], weights[order]
    threshold_idxs = np.r_[np.nonzero(np.diff(scores))[0], truth.size - 1]
    tps = np.cumsum(truth * weights)[threshold_idxs]
    fps = np.cumsum((1 - truth) * weights)[threshold_idxs]
    return fps, tps, scores[threshold_idxs]


def roc_curve(
    truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, drop_intermediate: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` as ``sklearn.metrics.roc_curve`` computes it.

    Rows of weight 0 are dropped; the curve starts at (0, 0) with threshold ``inf``. A rate whose
    denominator is 0 (no positives, or no negatives) is NaN throughout.
    """
    fps, tps, thresholds = _threshold_counts(truth, scores, weights)
    if drop_intermediate and fps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    thresholds = np.r_[np.inf, thresholds]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thresholds


def roc_auc(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Area under the ROC curve (trapezoids); NaN when the truth holds a single class."""
    truth_arr, _, _ = _binary_inputs(truth, scores, weights)
    if np.unique(truth_arr).size != 2:
        return math.nan
    fpr, tpr, _ = roc_curve(truth, scores, weights)
    return float(_trapezoid(tpr, fpr))


def auc_above_sensitivity(
    truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None, sensitivity_threshold: float = 0.8
) -> float:
    """Raw partial ROC AUC over the part of the curve with sensitivity >= ``sensitivity_threshold``.

    As the official ``auc_above_sensitivity`` (no McClish correction): the curve is cut at the
    threshold with a linearly interpolated point, and the area under the remaining segment is
    returned (at most ``1 - sensitivity_threshold``). NaN when the truth holds a single class.
    """
    if not 0 < sensitivity_threshold <= 1.0:
        raise ValueError(f"sensitivity_threshold must be in (0, 1], got {sensitivity_threshold}")
    fpr, tpr, _ = roc_curve(truth, scores, weights, drop_intermediate=False)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return math.nan
    index = int(tpr.searchsorted(sensitivity_threshold, side="left"))
    fpr_at_threshold = np.interp(sensitivity_threshold, tpr[index - 1 : index + 1], fpr[index - 1 : index + 1])
    tpr_segment = np.r_[sensitivity_threshold, tpr[index:]]
    fpr_segment = np.r_[fpr_at_threshold, fpr[index:]]
    return float(_trapezoid(tpr_segment, fpr_segment))


def average_precision(truth: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Average precision (step-wise area under the precision-recall curve, no interpolation).

    As ``sklearn.metrics.average_precision_score``: ``sum_n (R_n - R_{n-1}) P_n``; 0.0 when the
    truth has no positive.
    """
    fps, tps, _ = _threshold_counts(truth, scores, weights)
    predicted_positive = tps + fps
    precision = np.divide(tps, predicted_positive, out=np.zeros_like(tps), where=predicted_positive != 0)
    recall = tps / tps[-1] if tps[-1] != 0 else np.ones_like(tps)
    precision = np.r_[precision[::-1], 1.0]
    recall = np.r_[recall[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


# ----------------------------------------------------------------------------------------------- Task 3: classification


def probabilities_to_labels(probabilities: np.ndarray) -> np.ndarray:
    """Class index of the highest probability per row, or -1 ("undecided") where the maximum is tied."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be (N,K), got shape {probabilities.shape}")
    labels = probabilities.argmax(axis=1)
    is_max = probabilities == probabilities.max(axis=1, keepdims=True)
    labels[is_max.sum(axis=1) > 1] = -1
    return labels


def balanced_multiclass_accuracy(
    probabilities: np.ndarray, truth: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """Mean per-class recall over the classes present in the truth (ISIC 2018 Task 3 ranking metric); NaN if none.

    Args:
        probabilities: (N,K) predicted scores; a tied maximum counts as a wrong prediction.
        truth: (N,K) one-hot truth (an all-zero or tied row is left out) or (N,) class indices (-1 left out).
        weights: optional (N,) non-negative row weights.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    truth = np.asarray(truth)
    true_labels = probabilities_to_labels(truth) if truth.ndim == 2 else truth.astype(np.int64)
    pred_labels = probabilities_to_labels(probabilities)
    if true_labels.shape != pred_labels.shape:
        raise ValueError(f"truth has {true_labels.size} rows but probabilities have {pred_labels.size}")
    weights = np.ones(pred_labels.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    recalls = []
    for k in range(probabilities.shape[1]):
        is_class = true_labels == k
        frequency = weights[is_class].sum()
        if frequency == 0:
            continue  # 0/0: NaN in the official code, skipped by its mean
        recalls.append(weights[is_class & (pred_labels == k)].sum() / frequency)
    return float(np.mean(recalls)) if recalls else math.nan


def _one_hot_truth(
    probabilities: np.ndarray, truth: np.ndarray, weights: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 2 or probabilities.shape[0] == 0:
        raise ValueError(f"probabilities must be a non-empty (N,K) array, got shape {probabilities.shape}")
    n, k = probabilities.shape
    if not np.isfinite(probabilities).all() or (probabilities < 0).any() or (probabilities > 1).any():
        raise ValueError("probabilities must be finite and in [0, 1]")
    weights = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if weights.shape != (n,) or (weights < 0).any() or not np.isfinite(weights).all():
        raise ValueError(f"weights must be {n} finite non-negative values")
    truth = np.asarray(truth)
    if truth.ndim == 1:
        if truth.shape[0] != n:
            raise ValueError(f"truth has {truth.shape[0]} labels but probabilities have {n} rows")
        labels = truth.astype(np.int64)
        if (labels >= k).any() or (labels < -1).any():
            raise ValueError(f"labels must be class indices in [0, {k}) or -1 (unknown)")
        known = labels >= 0  # -1: unknown diagnosis (Batch contract), not scored
        return probabilities[known], np.eye(k)[labels[known]], weights[known]
    if truth.shape != probabilities.shape:
        raise ValueError(f"one-hot truth must be {probabilities.shape}, got {truth.shape}")
    truth = truth.astype(np.float64)
    if not np.isin(truth, (0.0, 1.0)).all():
        raise ValueError("one-hot truth must hold only 0 and 1")
    return probabilities, truth, weights


def nanmean(values: Iterable[float]) -> float:
    """The mean of the values that are not NaN (pandas' rule for macro averages); NaN, quietly, when all are."""
    finite = [value for value in values if not math.isnan(value)]
    return float(np.mean(finite)) if finite else math.nan


def classification_scores(
    probabilities: np.ndarray,
    truth: np.ndarray,
    class_names: Sequence[str] | None = None,
    weights: np.ndarray | None = None,
) -> dict[str, float]:
    """Task 3 metrics, as the official scorer reports them, in one flat dict.

    Args:
        probabilities: (N,K) predicted class probabilities in [0, 1].
        truth: (N,K) one-hot truth, or (N,) class indices where -1 (unknown) rows are dropped.
        class_names: K names used in the keys; default :data:`ISIC_CLASSES` when K is 7, else ``"0"``...
        weights: optional (N,) row weights (the truth CSV's ``score_weight``), default 1.

    Returns:
        ``balanced_accuracy``; per class ``{metric}/{class}`` for each of :data:`CLASSIFICATION_METRICS`
        (one-vs-rest, a probability > 0.5 counting as positive); ``macro/{metric}``, the mean skipping NaN.

    Raises:
        ValueError: on inconsistent shapes, probabilities outside [0, 1], or non-binary truth.
    """
    probabilities, truth, weights = _one_hot_truth(probabilities, truth, weights)
    k = probabilities.shape[1]
    if class_names is None:
        class_names = ISIC_CLASSES if k == len(ISIC_CLASSES) else tuple(str(i) for i in range(k))
    if len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for {k} probability columns")
    if probabilities.shape[0] == 0:
        raise ValueError("no rows with a known label to score")

    scores: dict[str, float] = {"balanced_accuracy": balanced_multiclass_accuracy(probabilities, truth, weights)}
    per_metric: dict[str, list[float]] = {metric: [] for metric in CLASSIFICATION_METRICS}
    for column, name in enumerate(class_names):
        class_truth, class_scores = truth[:, column], probabilities[:, column]
        cm = BinaryConfusion.from_binary(class_scores > 0.5, class_truth > 0.5, weights)
        values = {key: getattr(cm, key) for key in ("accuracy", "sensitivity", "specificity", "dice", "ppv", "npv")}
        values |= {
            "auc": roc_auc(class_truth, class_scores, weights),
            "auc_sens_80": auc_above_sensitivity(class_truth, class_scores, weights, 0.8),
            "ap": average_precision(class_truth, class_scores, weights),
        }
        for metric, value in values.items():
            scores[f"{metric}/{name}"] = float(value)
            per_metric[metric].append(float(value))
    for metric, values in per_metric.items():
        scores[f"macro/{metric}"] = nanmean(values)
    return scores


def read_classification_truth_csv(path: str | Path) -> tuple[list[str], np.ndarray, np.ndarray, tuple[str, ...]]:
    """Read an ISIC Task 3 ground-truth CSV (``image,MEL,NV,...`` one-hot, optional ``score_weight``).

    Returns:
        ``(image ids, one-hot truth (N,K), score weights (N,), class names)``; as the official reader, a
        missing ``score_weight`` column means 1 and ``ISIC_0035068`` gets weight 0.

    Raises:
        DataError: if the file is unreadable, has no ``image`` column, or duplicate images.
    """
    table, ids = _read_csv(path)
    weights = table["score_weight"].to_numpy(np.float64) if "score_weight" in table else np.ones(len(table))
    weights = np.where(np.isin(ids, list(ZERO_WEIGHT_IMAGES)), 0.0, weights)
    class_names = tuple(c for c in table.columns if c not in ("image", "score_weight", "validation_weight"))
    try:
        truth = table[list(class_names)].to_numpy(np.float64)
    except (TypeError, ValueError) as error:
        raise DataError(path, f"non-numeric ground truth ({error})") from error
    return ids, truth, weights, class_names


def read_classification_csv(path: str | Path, class_names: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """``(image ids, probabilities (N,K))`` of an ISIC Task 3 prediction CSV, checked as the official scorer does.

    Image names lose a trailing ``.jpg``; columns are returned in ``class_names`` order.

    Raises:
        DataError: on a missing ``image`` column, duplicate images, missing or extra class columns, missing
            or non-numeric values, or values outside [0, 1].
    """
    table, ids = _read_csv(path, strip_jpg=True)
    columns = [c for c in table.columns if c != "image"]
    missing = [c for c in class_names if c not in columns]
    extra = [c for c in columns if c not in class_names]
    if missing:
        raise DataError(path, f"missing class columns: {missing}")
    if extra:
        raise DataError(path, f"extra columns: {extra}")
    values = table[list(class_names)].apply(pd.to_numeric, errors="coerce")
    bad = [ids[i] for i in np.flatnonzero(values.isna().any(axis=1).to_numpy())]
    if bad:
        raise DataError(path, f"missing or non-numeric values for images: {bad[:10]}")
    probabilities = values.to_numpy(np.float64)
    outside = [ids[i] for i in np.flatnonzero(((probabilities < 0) | (probabilities > 1)).any(axis=1))]
    if outside:
        raise DataError(path, f"values outside [0, 1] for images: {outside[:10]}")
    return ids, probabilities


def _read_csv(path: str | Path, strip_jpg: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """The table and its ``image`` column, checked for duplicates (a trailing ``.jpg`` stripped when asked)."""
    try:
        table = pd.read_csv(path, header=0, index_col=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise DataError(path, f"cannot read CSV ({error})") from error
    if "image" not in table.columns:
        raise DataError(path, "missing column 'image'")
    images = table["image"].astype(str)
    ids = (images.str.replace(r"\.jpg$", "", case=False, regex=True) if strip_jpg else images).tolist()
    duplicates = sorted(image for image, count in Counter(ids).items() if count > 1)
    if duplicates:
        raise DataError(path, f"duplicate image rows: {duplicates}")
    return table, ids


def score_classification_csvs(pred_csv: str | Path, truth_csv: str | Path) -> dict[str, float]:
    """Score a Task 3 prediction CSV against the ground-truth CSV (see :func:`classification_scores`).

    Raises:
        DataError: on a malformed CSV, or images missing from / extra in the predictions.
    """
    truth_ids, truth, weights, class_names = read_classification_truth_csv(truth_csv)
    pred_ids, probabilities = read_classification_csv(pred_csv, class_names)
    missing = sorted(set(truth_ids) - set(pred_ids))
    extra = sorted(set(pred_ids) - set(truth_ids))
    if missing:
        raise DataError(pred_csv, f"missing images: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
    if extra:
        raise DataError(pred_csv, f"extra images: {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    row_of = {image: row for row, image in enumerate(pred_ids)}
    probabilities = probabilities[[row_of[image] for image in truth_ids]]
    scores = classification_scores(probabilities, truth, class_names, weights)
    scores["num_images"] = len(truth_ids)
    return scores


# -------------------------------------------------------------------------------------------- One report for both tasks


def isic_scores(
    *,
    pred_mask_dir: str | Path | None = None,
    truth_mask_dir: str | Path | None = None,
    pred_csv: str | Path | None = None,
    truth_csv: str | Path | None = None,
) -> dict[str, float | int | None]:
    """Score a submission for Task 1 and/or Task 3 into one flat, JSON-able dict.

    Mask folders (:func:`score_segmentation_folders`) give ``task1/{metric}``, CSVs
    (:func:`score_classification_csvs`) ``task3/{key}``; each prediction comes with its truth. NaN values
    become ``None`` so that ``json.dumps`` writes standard JSON.

    Raises:
        ValueError: if a prediction is given without its truth (or vice versa), or nothing is given.
    """
    if (pred_mask_dir is None) != (truth_mask_dir is None):
        raise ValueError("pred_mask_dir and truth_mask_dir must be given together")
    if (pred_csv is None) != (truth_csv is None):
        raise ValueError("pred_csv and truth_csv must be given together")
    if pred_mask_dir is None and pred_csv is None:
        raise ValueError("nothing to score: give mask folders and/or CSVs")
    report: dict[str, Any] = {}
    if pred_mask_dir is not None:
        report.update({f"task1/{k}": v for k, v in score_segmentation_folders(pred_mask_dir, truth_mask_dir).items()})
    if pred_csv is not None:
        report.update({f"task3/{k}": v for k, v in score_classification_csvs(pred_csv, truth_csv).items()})
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in report.items()}
