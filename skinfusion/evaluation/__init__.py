"""Evaluation: ISIC metrics, reports, calibration and studies that compare variants."""
