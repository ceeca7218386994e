"""Output files of ``predict``: ISIC Task 1 mask PNGs and the ISIC Task 3 CSV, each written atomically."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from skinfusion.io import atomic_write

__all__ = ["CSV_NAME", "JSON_DIR", "MASKS_DIR", "OVERLAYS_DIR", "mask_filename", "png_bytes", "write_csv", "write_mask"]

MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"
JSON_DIR = "json"
CSV_NAME = "predictions.csv"


def mask_filename(image_id: str) -> str:
    """File name of the predicted mask of ``image_id`` (the ISIC Task 1 convention)."""
    return f"{image_id}_segmentation.png"


def png_bytes(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array, mode=mode) if mode else Image.fromarray(array)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mask(path: str | Path, mask: np.ndarray) -> None:
    """Write a boolean mask as an 8-bit greyscale (mode L) PNG with values {0, 255}, atomically."""
    atomic_write(path, png_bytes(np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8), "L"))


def write_csv(path: str | Path, ids: Sequence[str], probabilities: np.ndarray, class_names: Sequence[str]) -> None:
    """Write the ISIC Task 3 CSV ``image,<class>...`` atomically (fixed-point floats, never ``1e-05``)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["image", *class_names])
    for image_id, row in zip(ids, probabilities, strict=True):
        writer.writerow([image_id, *(f"{float(p):.10f}" for p in row)])
    atomic_write(path, buffer.getvalue(), fsync=True)
