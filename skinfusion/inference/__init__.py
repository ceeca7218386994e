"""Inference: inputs, the Predictor, output writers, overlays, test-time augmentation, post-processing, export."""
