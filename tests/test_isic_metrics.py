"""ISIC metrics: hand-computed cases, and equality with the official ``isic-challenge-scoring``."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinfusion.errors import DataError
from skinfusion.evaluation.isic import (
    CLASSIFICATION_METRICS,
    SEGMENTATION_METRICS,
    BinaryConfusion,
    auc_above_sensitivity,
    average_precision,
    balanced_multiclass_accuracy,
    classification_scores,
    isic_scores,
    probabilities_to_labels,
    roc_auc,
    score_classification_csvs,
    score_segmentation_folders,
    segmentation_image_scores,
    segmentation_scores,
)

try:  # the official scorer is in the dev extra; the hand-computed tests run without it
    import isic_challenge_scoring as official
    from isic_challenge_scoring import metrics as official_metrics
except ImportError:  # pragma: no cover
    official = official_metrics = None

needs_official = pytest.mark.skipif(official is None, reason="isic-challenge-scoring (dev extra) is not installed")
TOL = 1e-6


# ---------------------------------------------------------------------------------------------
# Task 1, hand-computed
# ---------------------------------------------------------------------------------------------

TRUTH_4x4 = np.array(
    [
        [1, 1, 0, 0],
        [1, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ],
    dtype=bool,
)
# TP at (0,0),(0,1),(1,0); FP at (0,2); FN at (1,1); TN the other 11 pixels
PRED_4x4 = np.array(
    [
        [1, 1, 1, 0],
        [1, 0, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ],
    dtype=bool,
)
EMPTY_4x4 = np.zeros((4, 4), dtype=bool)

SEGMENTATION_CASES = {
    # name: (pred, truth, expected metrics)
    "partial overlap, jaccard 3/5 < 0.65": (
        PRED_4x4,
        TRUTH_4x4,
        {
            "accuracy": 14 / 16,
            "sensitivity": 3 / 4,
            "specificity": 11 / 12,
            "jaccard": 3 / 5,
            "threshold_jaccard": 0.0,
            "dice": 6 / 8,
        },
    ),
    "one false positive, jaccard 4/5 kept": (
        TRUTH_4x4 | (np.arange(16).reshape(4, 4) == 15),  # adds (3,3): TP 4, FP 1, FN 0, TN 11
        TRUTH_4x4,
        {
            "accuracy": 15 / 16,
            "sensitivity": 1.0,
            "specificity": 11 / 12,
            "jaccard": 4 / 5,
            "threshold_jaccard": 4 / 5,
            "dice": 8 / 9,
        },
    ),
    "prediction inside truth, jaccard 13/20 = threshold kept": (
        np.r_[np.ones(13), np.zeros(12)].astype(bool)[None],
        np.r_[np.ones(20), np.zeros(5)].astype(bool)[None],
        {
            "accuracy": 18 / 25,
            "sensitivity": 13 / 20,
            "specificity": 1.0,
            "jaccard": 13 / 20,
            "threshold_jaccard": 13 / 20,
            "dice": 26 / 33,
        },
    ),
    "empty prediction": (
        EMPTY_4x4,
        TRUTH_4x4,
        {
            "accuracy": 12 / 16,
            "sensitivity": 0.0,
            "specificity": 1.0,
            "jaccard": 0.0,
            "threshold_jaccard": 0.0,
            "dice": 0.0,
        },
    ),
    "empty truth: sensitivity is a freebie": (  # 4 FP, 12 TN
        PRED_4x4,
        EMPTY_4x4,
        {
            "accuracy": 12 / 16,
            "sensitivity": 1.0,
            "specificity": 12 / 16,
            "jaccard": 0.0,
            "threshold_jaccard": 0.0,
            "dice": 0.0,
        },
    ),
    "both empty: perfect": (
        EMPTY_4x4,
        EMPTY_4x4,
        {
            "accuracy": 1.0,
            "sensitivity": 1.0,
            "specificity": 1.0,
            "jaccard": 1.0,
            "threshold_jaccard": 1.0,
            "dice": 1.0,
        },
    ),
    "both full: specificity is a freebie": (
        ~EMPTY_4x4,
        ~EMPTY_4x4,
        {
            "accuracy": 1.0,
            "sensitivity": 1.0,
            "specificity": 1.0,
            "jaccard": 1.0,
            "threshold_jaccard": 1.0,
            "dice": 1.0,
        },
    ),
}


@pytest.mark.parametrize("case", list(SEGMENTATION_CASES))
def test_segmentation_image_scores_hand_computed(case):
    pred, truth, expected = SEGMENTATION_CASES[case]
    scores = segmentation_image_scores(pred, truth)
    assert set(scores) == set(SEGMENTATION_METRICS)
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-12), name


def test_confusion_counts_hand_computed():
    cm = BinaryConfusion.from_binary(PRED_4x4, TRUTH_4x4)
    assert (cm.tp, cm.tn, cm.fp, cm.fn) == (3, 11, 1, 1)
    assert cm.ppv == 3 / 4
    assert cm.npv == 11 / 12
    weighted = BinaryConfusion.from_binary(PRED_4x4, TRUTH_4x4, weights=np.full((4, 4), 0.5))
    assert (weighted.tp, weighted.tn, weighted.fp, weighted.fn) == (1.5, 5.5, 0.5, 0.5)


def test_eight_bit_masks_are_foreground_above_128():
    truth = np.array([[0, 128, 129, 255]], dtype=np.uint8)  # foreground: 129, 255
    pred = np.array([[255, 255, 0, 255]], dtype=np.uint8)  # foreground: 0th, 1st, 3rd
    scores = segmentation_image_scores(pred, truth)
    # TP 1 (255/255), FP 2, FN 1 (129), TN 0
    assert scores["jaccard"] == pytest.approx(1 / 4)
    assert scores["dice"] == pytest.approx(2 / 5)


def test_segmentation_scores_average_per_image():
    preds = [PRED_4x4, EMPTY_4x4, np.ones((2, 3), dtype=np.uint8) * 255]
    truths = [TRUTH_4x4, EMPTY_4x4, np.ones((2, 3), dtype=np.uint8) * 255]
    scores = segmentation_scores(iter(preds), iter(truths))
    assert scores["num_images"] == 3
    assert scores["jaccard"] == pytest.approx((3 / 5 + 1 + 1) / 3)
    assert scores["threshold_jaccard"] == pytest.approx((0 + 1 + 1) / 3)
    assert scores["dice"] == pytest.approx((6 / 8 + 1 + 1) / 3)


def test_segmentation_size_mismatch_is_data_error():
    with pytest.raises(DataError, match="3x4 .*4x4"):
        segmentation_scores([np.zeros((4, 3), bool)], [TRUTH_4x4])


@pytest.mark.parametrize(
    ("pred", "truth", "match"),
    [
        (np.zeros((4, 4), np.float32), TRUTH_4x4, "dtype"),
        (np.zeros((1, 4, 4), bool), TRUTH_4x4, "2-D"),
        (np.zeros((0, 4), bool), np.zeros((0, 4), bool), "empty"),
    ],
)
def test_segmentation_bad_masks_raise_value_error(pred, truth, match):
    with pytest.raises(ValueError, match=match):
        segmentation_image_scores(pred, truth)


def test_segmentation_length_mismatch_and_empty_raise():
    with pytest.raises(ValueError, match="differ in length"):
        segmentation_scores([TRUTH_4x4, TRUTH_4x4], [TRUTH_4x4])
    with pytest.raises(ValueError, match="no images"):
        segmentation_scores([], [])


# ---------------------------------------------------------------------------------------------
# Task 1, folders
# ---------------------------------------------------------------------------------------------


def _write_mask(path: Path, mask: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).convert(mode).save(path)


def test_score_segmentation_folders_hand_computed(tmp_path):
    _write_mask(tmp_path / "truth" / "ISIC_0000001_segmentation.png", TRUTH_4x4)
    _write_mask(tmp_path / "truth" / "ISIC_0000002_segmentation.png", EMPTY_4x4)
    (tmp_path / "truth" / "ATTRIBUTION.txt").write_text("not a mask")
    _write_mask(tmp_path / "pred" / "ISIC_0000001_segmentation.png", PRED_4x4)
    _write_mask(tmp_path / "pred" / "ISIC_0000002_segmentation.png", EMPTY_4x4, mode="1")
    _write_mask(tmp_path / "pred" / "ISIC_0000099_segmentation.png", EMPTY_4x4)  # no truth: ignored
    scores = score_segmentation_folders(tmp_path / "pred", tmp_path / "truth")
    assert scores["num_images"] == 2
    assert scores["jaccard"] == pytest.approx((3 / 5 + 1) / 2)
    assert scores["sensitivity"] == pytest.approx((3 / 4 + 1) / 2)


def test_score_segmentation_folders_missing_prediction_names_image(tmp_path):
    _write_mask(tmp_path / "truth" / "ISIC_0000001_segmentation.png", TRUTH_4x4)
    _write_mask(tmp_path / "truth" / "ISIC_0000002_segmentation.png", TRUTH_4x4)
    _write_mask(tmp_path / "pred" / "ISIC_0000001_segmentation.png", TRUTH_4x4)
    with pytest.raises(DataError, match="ISIC_0000002"):
        score_segmentation_folders(tmp_path / "pred", tmp_path / "truth")


def test_score_segmentation_folders_size_mismatch_names_file(tmp_path):
    _write_mask(tmp_path / "truth" / "ISIC_0000001_segmentation.png", np.zeros((40, 60), bool))
    _write_mask(tmp_path / "pred" / "ISIC_0000001_segmentation.png", np.zeros((30, 60), bool))
    with pytest.raises(DataError, match=r"ISIC_0000001_segmentation.png.*60x30.*60x40"):
        score_segmentation_folders(tmp_path / "pred", tmp_path / "truth")


def test_score_segmentation_folders_rejects_rgb_and_ambiguous(tmp_path):
    _write_mask(tmp_path / "truth" / "ISIC_0000001_segmentation.png", TRUTH_4x4)
    _write_mask(tmp_path / "pred" / "ISIC_0000001_segmentation.png", TRUTH_4x4, mode="RGB")
    with pytest.raises(DataError, match="single-channel"):
        score_segmentation_folders(tmp_path / "pred", tmp_path / "truth")
    _write_mask(tmp_path / "pred" / "ISIC_0000001_segmentation.png", TRUTH_4x4)
    _write_mask(tmp_path / "pred" / "ISIC_0000001_other.png", TRUTH_4x4)
    with pytest.raises(DataError, match="several"):
        score_segmentation_folders(tmp_path / "pred", tmp_path / "truth")


# ---------------------------------------------------------------------------------------------
# Task 3, hand-computed
# ---------------------------------------------------------------------------------------------

# truth: 0, 0, 1, 2 ; class 3 never occurs
PROBS = np.array(
    [
        [0.6, 0.3, 0.1, 0.0],  # -> 0, right
        [0.4, 0.4, 0.2, 0.0],  # tie 0/1 -> undecided, wrong
        [0.2, 0.7, 0.1, 0.0],  # -> 1, right
        [0.5, 0.1, 0.4, 0.0],  # -> 0, wrong
    ]
)
LABELS = np.array([0, 0, 1, 2])
NAMES = ("A", "B", "C", "D")


def test_probabilities_to_labels_marks_ties():
    np.testing.assert_array_equal(probabilities_to_labels(PROBS), [0, -1, 1, 0])


def test_balanced_accuracy_hand_computed():
    # recalls: A 1/2, B 1/1, C 0/1, D absent (left out)
    assert balanced_multiclass_accuracy(PROBS, LABELS) == pytest.approx(0.5)
    assert balanced_multiclass_accuracy(PROBS, np.eye(4)[LABELS]) == pytest.approx(0.5)
    # weights: the tied row weighs 0 -> A 1/1, B 1, C 0
    assert balanced_multiclass_accuracy(PROBS, LABELS, np.array([1, 0, 1, 1.0])) == pytest.approx(2 / 3)


def test_classification_scores_hand_computed():
    scores = classification_scores(PROBS, LABELS, NAMES)
    assert scores["balanced_accuracy"] == pytest.approx(0.5)
    # class A one-vs-rest: truth 1,1,0,0; predicted (> 0.5) 1,0,0,0 (0.5 is not > 0.5)
    expected_a = {
        "accuracy": 3 / 4,
        "sensitivity": 1 / 2,
        "specificity": 1.0,
        "dice": 2 / 3,
        "ppv": 1.0,
        "npv": 2 / 3,
        # positives 0.6, 0.4 vs negatives 0.2, 0.5: 3 of 4 pairs ordered
        "auc": 3 / 4,
        # ROC (0,0) (0,.5) (.5,.5) (.5,1) (1,1): above tpr .8 the area is .5
        "auc_sens_80": 0.5,
        # ranked 0.6+ 0.5- 0.4+ 0.2-: recall steps .5 at precision 1 and .5 at precision 2/3
        "ap": 0.5 + 0.5 * 2 / 3,
    }
    for metric, value in expected_a.items():
        assert scores[f"{metric}/A"] == pytest.approx(value), metric
    # class D is absent from the truth and never predicted: freebies, undefined curves, AP 0
    for metric in ("accuracy", "sensitivity", "specificity", "dice", "ppv", "npv"):
        assert scores[f"{metric}/D"] == 1.0
    assert math.isnan(scores["auc/D"])
    assert math.isnan(scores["auc_sens_80/D"])
    assert scores["ap/D"] == 0.0
    # macro averages skip NaN
    aucs = [scores[f"auc/{name}"] for name in "ABC"]
    assert scores["macro/auc"] == pytest.approx(np.mean(aucs))
    assert scores["macro/ap"] == pytest.approx(np.mean([scores[f"ap/{name}"] for name in NAMES]))


def test_classification_scores_keys_and_unknown_labels():
    scores = classification_scores(
        np.vstack([PROBS, [[0.9, 0.1, 0.0, 0.0]]]), np.r_[LABELS, -1], NAMES
    )  # the -1 row is dropped
    expected_keys = {"balanced_accuracy"}
    expected_keys |= {f"{m}/{n}" for m in CLASSIFICATION_METRICS for n in NAMES}
    expected_keys |= {f"macro/{m}" for m in CLASSIFICATION_METRICS}
    assert set(scores) == expected_keys
    assert scores["balanced_accuracy"] == pytest.approx(0.5)
    assert scores["accuracy/A"] == pytest.approx(3 / 4)


def test_curve_metrics_hand_computed():
    truth = np.array([1, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.8, 0.1])  # tie between a positive and a negative: half a pair
    assert roc_auc(truth, scores) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    # ranked: 0.9+ then {0.8+, 0.8-} together: P@R.5 = 1, P@R1 = 2/3
    assert average_precision(truth, scores) == pytest.approx(0.5 + 0.5 * 2 / 3)
    # ROC (0,0) (0,.5) (.5,1) (1,1): tpr .8 is reached at fpr .3; area (.5-.3)*(.8+1)/2 + (1-.5)*1
    assert auc_above_sensitivity(truth, scores) == pytest.approx(0.2 * 1.8 / 2 + 0.5)


@pytest.mark.parametrize(
    ("probs", "truth", "match"),
    [
        (PROBS[:, :3], np.array([0, 0, 1, 3]), "class indices"),
        (PROBS * 2, LABELS, r"\[0, 1\]"),
        (PROBS, LABELS[:3], "labels"),
        (PROBS, np.full((4, 4), 0.5), "only 0 and 1"),
    ],
)
def test_classification_bad_inputs_raise_value_error(probs, truth, match):
    with pytest.raises(ValueError, match=match):
        classification_scores(probs, truth)


def _write_csvs(tmp_path, ids, probs, truth, names, weights=None):
    pred = pd.DataFrame(probs, columns=list(names))
    pred.insert(0, "image", ids)
    truth_table = pd.DataFrame(truth, columns=list(names))
    truth_table.insert(0, "image", ids)
    if weights is not None:
        truth_table["score_weight"] = weights
        truth_table["validation_weight"] = 1.0
    pred_path, truth_path = tmp_path / "pred.csv", tmp_path / "truth.csv"
    pred.iloc[::-1].to_csv(pred_path, index=False)  # row order must not matter
    truth_table.to_csv(truth_path, index=False)
    return pred_path, truth_path


def test_score_classification_csvs_hand_computed(tmp_path):
    ids = [f"ISIC_{i:07d}" for i in range(4)]
    pred_path, truth_path = _write_csvs(tmp_path, ids, PROBS, np.eye(4)[LABELS], NAMES)
    scores = score_classification_csvs(pred_path, truth_path)
    assert scores["balanced_accuracy"] == pytest.approx(0.5)
    assert scores["auc/A"] == pytest.approx(3 / 4)
    assert scores["num_images"] == 4


def test_score_classification_csvs_errors(tmp_path):
    ids = [f"ISIC_{i:07d}" for i in range(4)]
    pred_path, truth_path = _write_csvs(tmp_path, ids, PROBS, np.eye(4)[LABELS], NAMES)
    table = pd.read_csv(pred_path)
    table.iloc[:3].to_csv(pred_path, index=False)
    with pytest.raises(DataError, match="missing images"):
        score_classification_csvs(pred_path, truth_path)
    table.drop(columns=["D"]).to_csv(pred_path, index=False)
    with pytest.raises(DataError, match=r"missing class columns: \['D'\]"):
        score_classification_csvs(pred_path, truth_path)
    table.assign(A=table["A"] + 1).to_csv(pred_path, index=False)
    with pytest.raises(DataError, match="outside"):
        score_classification_csvs(pred_path, truth_path)


def test_isic_scores_is_flat_json(tmp_path):
    _write_mask(tmp_path / "truth" / "ISIC_0000000_segmentation.png", TRUTH_4x4)
    _write_mask(tmp_path / "pred" / "ISIC_0000000_segmentation.png", PRED_4x4)
    ids = [f"ISIC_{i:07d}" for i in range(4)]
    pred_csv, truth_csv = _write_csvs(tmp_path, ids, PROBS, np.eye(4)[LABELS], NAMES)
    report = isic_scores(
        pred_mask_dir=tmp_path / "pred", truth_mask_dir=tmp_path / "truth", pred_csv=pred_csv, truth_csv=truth_csv
    )
    assert report["task1/jaccard"] == pytest.approx(3 / 5)
    assert report["task3/balanced_accuracy"] == pytest.approx(0.5)
    assert report["task3/auc/D"] is None  # NaN -> null
    assert json.loads(json.dumps(report, allow_nan=False)) == report
    with pytest.raises(ValueError, match="together"):
        isic_scores(pred_csv=pred_csv)


# ---------------------------------------------------------------------------------------------
# Equality with the official scorer
# ---------------------------------------------------------------------------------------------


def _random_masks(rng, shape):
    """A perturbed ellipse (Jaccard near the 0.65 threshold) or noise, as {0,255} uint8."""
    h, w = shape
    yy, xx = np.mgrid[:h, :w]
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    ry, rx = rng.uniform(1, h), rng.uniform(1, w)
    truth = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    kind = rng.integers(4)
    if kind == 0:
        pred = rng.random(shape) < 0.5
    else:
        scale = rng.uniform(0.6, 1.4)
        pred = ((yy - cy - rng.normal(0, 2)) / (ry * scale)) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        pred ^= rng.random(shape) < 0.02 * kind
    return (pred * 255).astype(np.uint8), (truth * 255).astype(np.uint8)


def _official_segmentation(preds, truths):
    pairs = [
        SimpleNamespace(truth_image=t, prediction_image=p, image_id=f"ISIC_{i:07d}")
        for i, (p, t) in enumerate(zip(preds, truths, strict=True))
    ]
    return official.SegmentationScore(pairs).macro_average


@needs_official
@pytest.mark.parametrize("shape", [(1, 1), (7, 5), (64, 48), (301, 203)])
def test_segmentation_equals_official_on_random_masks(shape):
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    pairs = [_random_masks(rng, shape) for _ in range(12)]
    preds, truths = [p for p, _ in pairs], [t for _, t in pairs]
    # edge cases in the same batch: empty prediction, empty truth, both empty, both full
    empty, full = np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)
    preds += [empty, truths[0], empty, full]
    truths += [truths[0], empty, empty, full]
    expected = _official_segmentation(preds, truths)
    ours = segmentation_scores(preds, truths)
    for name in SEGMENTATION_METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=TOL), name
    # per image too
    for pred, truth in zip(preds, truths, strict=True):
        expected_one = _official_segmentation([pred], [truth])
        ours_one = segmentation_image_scores(pred, truth)
        for name in SEGMENTATION_METRICS:
            assert ours_one[name] == pytest.approx(expected_one[name], abs=TOL), name


@needs_official
def test_segmentation_folders_equal_official_from_dir(tmp_path):
    rng = np.random.default_rng(7)
    for i, shape in enumerate([(40, 60), (33, 21), (80, 80), (50, 70), (12, 9)]):
        pred, truth = _random_masks(rng, shape)
        if i == 3:
            pred = np.zeros_like(pred)
        Image.fromarray(truth).save(_mkdir(tmp_path / "truth") / f"ISIC_{i:07d}_segmentation.png")
        Image.fromarray(pred).save(_mkdir(tmp_path / "pred") / f"ISIC_{i:07d}_segmentation.png")
    expected = official.SegmentationScore.from_dir(tmp_path / "truth", tmp_path / "pred").macro_average
    ours = score_segmentation_folders(tmp_path / "pred", tmp_path / "truth")
    for name in SEGMENTATION_METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=TOL), name


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _official_classification(probs, onehot, names, weights=None):
    index = [f"ISIC_{i:07d}" for i in range(len(probs))]
    truth = pd.DataFrame(onehot.astype(float), columns=list(names), index=index)
    pred = pd.DataFrame(probs, columns=list(names), index=index)
    w = np.ones(len(probs)) if weights is None else weights
    truth_weights = pd.DataFrame({"score_weight": w, "validation_weight": w}, index=index)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return official.ClassificationScore(truth, pred, truth_weights, official.ClassificationMetric.BALANCED_ACCURACY)


def _assert_matches_official(ours, score, names):
    assert ours["balanced_accuracy"] == pytest.approx(score.aggregate["balanced_accuracy"], abs=TOL)
    for name in names:
        for metric in CLASSIFICATION_METRICS:
            expected = score.per_category.loc[name, metric]
            assert ours[f"{metric}/{name}"] == pytest.approx(expected, abs=TOL, nan_ok=True), (name, metric)
    for metric in CLASSIFICATION_METRICS:
        assert ours[f"macro/{metric}"] == pytest.approx(score.macro_average[metric], abs=TOL), metric


def _random_classification(rng, n, k, decimals=None):
    labels = np.r_[np.arange(k), rng.integers(0, k, n - k)]  # every class present
    rng.shuffle(labels)
    probs = rng.dirichlet(np.full(k, 0.7), size=n)
    # a bias towards the truth so that curves are not trivial
    probs = 0.6 * probs + 0.4 * np.eye(k)[labels] * rng.random((n, 1))
    probs /= probs.sum(axis=1, keepdims=True)
    if decimals is not None:  # coarse values: many ties, within and across rows
        probs = np.round(probs, decimals)
    return probs, labels


@needs_official
@pytest.mark.parametrize(("n", "k", "decimals"), [(20, 2, None), (60, 7, None), (200, 7, 1), (97, 5, 2)])
def test_classification_equals_official_on_random_probabilities(n, k, decimals):
    rng = np.random.default_rng(n + k)
    probs, labels = _random_classification(rng, n, k, decimals)
    names = [f"c{i}" for i in range(k)]
    score = _official_classification(probs, np.eye(k)[labels], names)
    _assert_matches_official(classification_scores(probs, labels, names), score, names)


@needs_official
def test_classification_ties_equal_official():
    # explicit ties for the top probability in predictions, plus a tied (undecided) truth row
    probs = np.array(
        [[0.5, 0.5, 0.0], [0.4, 0.2, 0.4], [0.2, 0.7, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [1 / 3, 1 / 3, 1 / 3]]
    )
    truth = np.array([[1, 0, 0], [0, 0, 1], [0, 1, 0], [0, 0, 1], [1, 0, 0], [1, 1, 0]], dtype=float)
    names = ["A", "B", "C"]
    ours = classification_scores(probs, truth, names)
    expected_ba = official_metrics.balanced_multiclass_accuracy(
        pd.DataFrame(truth, columns=names), pd.DataFrame(probs, columns=names), pd.Series(np.ones(6))
    )
    assert ours["balanced_accuracy"] == pytest.approx(expected_ba, abs=TOL)
    # hand: A rows 0,4 (row 5 undecided truth): 0 right; B row 2 right; C rows 1 (tie, wrong), 3 right
    assert ours["balanced_accuracy"] == pytest.approx((0 + 1 + 0.5) / 3)
    _assert_matches_official(ours, _official_classification(probs, truth, names), names)


@needs_official
def test_classification_weights_equal_official(tmp_path):
    rng = np.random.default_rng(3)
    probs, labels = _random_classification(rng, 50, 4, decimals=2)
    weights = rng.choice([0.0, 0.5, 1.0, 2.0], size=50)
    weights[:4] = 1.0
    names = ["A", "B", "C", "D"]
    score = _official_classification(probs, np.eye(4)[labels], names, weights)
    _assert_matches_official(classification_scores(probs, labels, names, weights), score, names)


@needs_official
def test_classification_csvs_equal_official_from_file(tmp_path):
    rng = np.random.default_rng(11)
    probs, labels = _random_classification(rng, 80, 7, decimals=3)
    ids = [f"ISIC_{i:07d}" for i in range(35060, 35140)]  # includes ISIC_0035068, weighted 0 by both
    names = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    pred_path, truth_path = _write_csvs(tmp_path, ids, probs, np.eye(7)[labels], names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = official.ClassificationScore.from_file(
            truth_path, pred_path, official.ClassificationMetric.BALANCED_ACCURACY
        )
    ours = score_classification_csvs(pred_path, truth_path)
    _assert_matches_official(ours, score, names)
    weights = np.ones(80)
    weights[ids.index("ISIC_0035068")] = 0.0
    for key, value in classification_scores(probs, labels, names, weights).items():
        assert ours[key] == pytest.approx(value, abs=1e-12, nan_ok=True), key


@needs_official
def test_class_absent_from_truth_matches_official_metric_functions():
    rng = np.random.default_rng(5)
    probs, labels = _random_classification(rng, 40, 4, decimals=2)
    labels[labels == 3] = 0  # class 3 absent from the truth
    names = ["A", "B", "C", "D"]
    truth = pd.DataFrame(np.eye(4)[labels], columns=names)
    pred = pd.DataFrame(probs, columns=names)
    weights = pd.Series(np.ones(40))
    ours = classification_scores(probs, labels, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert ours["balanced_accuracy"] == pytest.approx(
            official_metrics.balanced_multiclass_accuracy(truth, pred, weights), abs=TOL
        )
        for name in names:
            assert ours[f"auc/{name}"] == pytest.approx(
                official_metrics.auc(truth[name], pred[name], weights), abs=TOL, nan_ok=True
            )
            assert ours[f"ap/{name}"] == pytest.approx(
                official_metrics.average_precision(truth[name], pred[name], weights), abs=TOL
            )
        # the official package cannot score this case at all (its partial AUC interpolates an
        # empty curve); we report NaN for the undefined partial AUC instead
        # (older scikit-learn already fails in roc_auc_score: "Only one class present")
        with pytest.raises(ValueError, match=r"empty|one class"):
            official.ClassificationScore(
                truth,
                pred,
                pd.DataFrame({"score_weight": weights, "validation_weight": weights}),
                official.ClassificationMetric.BALANCED_ACCURACY,
            )
    assert math.isnan(ours["auc/D"])
    assert math.isnan(ours["auc_sens_80/D"])
    assert ours["macro/auc"] == pytest.approx(np.mean([ours[f"auc/{n}"] for n in "ABC"]))


# ---------------------------------------------------------------------------------------------
# Real ISIC 2018 data (SKINFUSION_DATA)
# ---------------------------------------------------------------------------------------------


@needs_official
@pytest.mark.real_data
def test_real_masks_through_low_res_pipeline_equal_official(shared_data, tmp_path):
    """Real masks squeezed to 64x64 probabilities and post-processed back: scored as the official scorer does."""
    import shutil

    import cv2

    from skinfusion.inference.postprocess import PostProcess

    truth_files = sorted((shared_data / "isic2018" / "ISIC2018_Task1_Training_GroundTruth").glob("*.png"))[:25]
    if not truth_files:
        pytest.skip("no ISIC 2018 Task 1 ground truth under SKINFUSION_DATA")
    post = PostProcess(opening_radius=2)
    for i, truth_file in enumerate(truth_files):
        shutil.copy(truth_file, _mkdir(tmp_path / "truth") / truth_file.name)
        truth = np.asarray(Image.open(truth_file))
        prob = cv2.resize(truth.astype(np.float32) / 255, (64, 64), interpolation=cv2.INTER_AREA)
        if i % 5 == 0:
            prob = np.roll(prob, 12, axis=1)  # some poor predictions, to exercise the 0.65 threshold
        mask = post(prob, size=(truth.shape[1], truth.shape[0]))
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8)).save(_mkdir(tmp_path / "pred") / truth_file.name)
    expected = official.SegmentationScore.from_dir(tmp_path / "truth", tmp_path / "pred").macro_average
    ours = score_segmentation_folders(tmp_path / "pred", tmp_path / "truth")
    for name in SEGMENTATION_METRICS:
        assert ours[name] == pytest.approx(expected[name], abs=TOL), name
    assert ours["jaccard"] > 0.7


@needs_official
@pytest.mark.real_data
def test_real_task3_truth_csv_equal_official(shared_data, tmp_path):
    truth_csv = shared_data / "isic2018" / "ISIC2018_Task3_Training_GroundTruth.csv"
    if not truth_csv.is_file():
        pytest.skip("no ISIC 2018 Task 3 ground truth under SKINFUSION_DATA")
    truth = pd.read_csv(truth_csv)
    rng = np.random.default_rng(0)
    names = list(truth.columns[1:])
    onehot = truth[names].to_numpy()
    probs = 0.7 * rng.dirichlet(np.ones(len(names)), size=len(truth)) + 0.3 * onehot * rng.random((len(truth), 1))
    probs = np.round(probs / probs.sum(axis=1, keepdims=True), 3)
    pred = pd.DataFrame(probs, columns=names)
    pred.insert(0, "image", truth["image"] + ".jpg")  # the official reader drops ".jpg"
    pred.to_csv(tmp_path / "pred.csv", index=False)
    ours = score_classification_csvs(tmp_path / "pred.csv", truth_csv)
    # The official scorer cannot score a class absent from the truth (before 2026-11-30 this copy had
    # no DF image), so compare on the present classes only; an absent class is left out of the
    # balanced accuracy either way.
    present = [name for name in names if onehot[:, names.index(name)].any()]
    for name in set(names) - set(present):
        assert math.isnan(ours[f"auc/{name}"])
    truth[["image", *present]].to_csv(tmp_path / "truth_present.csv", index=False)
    pred[["image", *present]].to_csv(tmp_path / "pred_present.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score = official.ClassificationScore.from_file(
            tmp_path / "truth_present.csv",
            tmp_path / "pred_present.csv",
            official.ClassificationMetric.BALANCED_ACCURACY,
        )
    ours_present = score_classification_csvs(tmp_path / "pred_present.csv", tmp_path / "truth_present.csv")
    _assert_matches_official(ours_present, score, present)
    for name in present:
        for metric in CLASSIFICATION_METRICS:
            assert ours[f"{metric}/{name}"] == pytest.approx(ours_present[f"{metric}/{name}"], abs=1e-12)
