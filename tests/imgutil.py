"""Helpers that write tiny images, masks and dataset trees for the data tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def rgb(w: int = 32, h: int = 24, seed: int = 0) -> np.ndarray:
    """A smooth random RGB image (smooth so JPEG keeps it close)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 215, size=(3,), dtype=np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(base[c] + 20 * np.sin(xx / 5 + c) + 20 * np.cos(yy / 7)) for c in range(3)], axis=-1)
    return np.clip(img, 0, 255).astype(np.uint8)


def disk(w: int = 32, h: int = 24, r: float | None = None) -> np.ndarray:
    """A {0,255} uint8 disk mask."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = r if r is not None else min(w, h) / 3
    return (((xx - w / 2) ** 2 + (yy - h / 2) ** 2) <= r * r).astype(np.uint8) * 255


def save(path: Path, array: np.ndarray, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def make_task1(root: Path, ids: list[str], subset: str = "Training", w: int = 40, h: int = 30, masks: bool = True):
    for k, i in enumerate(ids):
        save(root / f"ISIC2018_Task1-2_{subset}_Input" / f"{i}.jpg", rgb(w, h, k), quality=95)
        if masks:
            save(root / f"ISIC2018_Task1_{subset}_GroundTruth" / f"{i}_segmentation.png", disk(w, h))
    (root / f"ISIC2018_Task1-2_{subset}_Input" / "LICENSE.txt").write_text("CC BY-NC")
    (root / f"ISIC2018_Task1-2_{subset}_Input" / "ATTRIBUTION.txt").write_text("ISIC")


def make_task3(root: Path, labels: dict[str, str], lesions: dict[str, str] | None = None, masks: bool = True):
    classes = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    lines = ["image," + ",".join(classes)]
    meta = ["lesion_id,image_id,dx,dx_type,age,sex,localization"]
    for k, (i, label) in enumerate(labels.items()):
        save(root / "ISIC2018_Task3_Training_Input" / f"{i}.jpg", rgb(20, 15, k), quality=95)
        if masks:
            save(root / "HAM10000_segmentations_lesion_tschandl" / f"{i}_segmentation.png", disk(20, 15))
        lines.append(i + "," + ",".join("1.0" if c == label else "0.0" for c in classes))
        lesion = (lesions or {}).get(i, f"HAM_{k:07d}")
        meta.append(f"{lesion},{i},{label.lower()},histo,{40 + k}.0,{'male' if k % 2 else 'female'},back")
    (root / "ISIC2018_Task3_Training_GroundTruth.csv").write_text("\n".join(lines) + "\n")
    (root / "HAM10000_metadata.csv").write_text("\n".join(meta) + "\n")
