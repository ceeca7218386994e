"""Evaluation: the official ISIC challenge metrics, the training metrics, the evaluation report, calibration,
and studies that compare variants."""
