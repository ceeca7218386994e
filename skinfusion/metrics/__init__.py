"""Metrics: the official ISIC challenge scores (numpy) and torchmetrics collections.

Each submodule adds its public names below; keep one import block per submodule.
"""

from skinfusion.metrics.isic import (
    CLASSIFICATION_METRICS,
    JACCARD_THRESHOLD,
    SEGMENTATION_METRICS,
    BinaryConfusion,
    balanced_multiclass_accuracy,
    classification_scores,
    isic_scores,
    score_classification_csvs,
    score_segmentation_folders,
    segmentation_image_scores,
    segmentation_scores,
)

__all__ = [
    "CLASSIFICATION_METRICS",
    "JACCARD_THRESHOLD",
    "SEGMENTATION_METRICS",
    "BinaryConfusion",
    "balanced_multiclass_accuracy",
    "classification_scores",
    "isic_scores",
    "score_classification_csvs",
    "score_segmentation_folders",
    "segmentation_image_scores",
    "segmentation_scores",
]
