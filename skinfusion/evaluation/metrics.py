"""torchmetrics collections logged during training, validation and test.

These work at the training resolution and are correct under DDP (every state is a sum that torchmetrics
all-reduces); the ISIC numbers at the original resolution come from :mod:`skinfusion.evaluation.isic`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

__all__ = ["SegmentationScores", "classification_metrics", "flatten_metrics", "segmentation_metrics"]

IGNORE_INDEX = -1


class SegmentationScores(Metric):
    """Per-image Dice, Jaccard and thresholded Jaccard, averaged over images.

    As in the ISIC 2018 Task 1 scorer, an image whose predicted and true masks are both empty scores 1, and a
    Jaccard below ``jaccard_threshold`` counts 0 in the thresholded mean. ``threshold``: the probability above
    which a pixel is lesion.

    Shape:
        update(mask_logits (N,1,H,W), target (N,1,H,W) in {0,1}); compute() -> dict of scalars.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, threshold: float = 0.5, jaccard_threshold: float = 0.65, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold
        self.jaccard_threshold = jaccard_threshold
        for name in ("dice", "jaccard", "threshold_jaccard", "count"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, mask_logits: Tensor, target: Tensor) -> None:
        pred = (mask_logits.detach().float().sigmoid() > self.threshold).flatten(1)
        true = (target > 0.5).flatten(1)
        tp = (pred & true).sum(1).double()
        fp = (pred & ~true).sum(1).double()
        fn = (~pred & true).sum(1).double()
        union = tp + fp + fn
        jaccard = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))
        dice = torch.where(union > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), torch.ones_like(tp))
        self.dice += dice.sum()
        self.jaccard += jaccard.sum()
        self.threshold_jaccard += torch.where(jaccard >= self.jaccard_threshold, jaccard, 0.0).sum()
        self.count += pred.shape[0]

    def compute(self) -> dict[str, Tensor]:
        n = self.count.clamp_min(1)
        return {
            "dice": (self.dice / n).float(),
            "jaccard": (self.jaccard / n).float(),
            "threshold_jaccard": (self.threshold_jaccard / n).float(),
        }


def segmentation_metrics(threshold: float = 0.5) -> MetricCollection:
    """The segmentation collection: ``dice``, ``jaccard``, ``threshold_jaccard`` (per image, mean)."""
    return MetricCollection({"seg": SegmentationScores(threshold=threshold)})


def classification_metrics(num_classes: int) -> MetricCollection:
    """The classification collection; label ``-1`` (unknown) is ignored by every metric.

    Names are the ISIC scorer's where it computes the same number: ``accuracy``, ``balanced_accuracy`` (the ISIC
    2018 Task 3 ranking metric, the mean per-class recall) and ``auc`` (macro one-vs-rest). ``precision``,
    ``recall`` and ``f1`` (per class and macro) score the arg-max prediction, which the scorer's one-vs-rest
    ``ppv``/``sensitivity``/``dice`` at probability 0.5 do not.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    kw = {"num_classes": num_classes, "ignore_index": IGNORE_INDEX}
    return MetricCollection(
        {
            "accuracy": MulticlassAccuracy(average="micro", **kw),
            "balanced_accuracy": MulticlassRecall(average="macro", **kw),
            "precision_macro": MulticlassPrecision(average="macro", **kw),
            "f1_macro": MulticlassF1Score(average="macro", **kw),
            "precision": MulticlassPrecision(average="none", **kw),
            "recall": MulticlassRecall(average="none", **kw),
            "f1": MulticlassF1Score(average="none", **kw),
            "auc": MulticlassAUROC(average="macro", **kw),
            "confmat": MulticlassConfusionMatrix(**kw),
        }
    )


def flatten_metrics(values: dict[str, Tensor], class_names: Sequence[str], prefix: str) -> dict[str, Tensor]:
    """Turn a computed collection into loggable scalars named ``{prefix}/{name}``.

    Per-class vectors become ``{prefix}/{name}/{class}``; the confusion matrix and other non-scalar values
    are left out (callbacks log them as images/tables).
    """
    flat: dict[str, Tensor] = {}
    for name, value in values.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, class_names, prefix))
            continue
        name = name.removeprefix("seg_")
        if value.ndim == 0:
            flat[f"{prefix}/{name}"] = value
        elif value.ndim == 1 and len(value) == len(class_names):
            flat.update({f"{prefix}/{name}/{c}": v for c, v in zip(class_names, value, strict=True)})
    return flat
