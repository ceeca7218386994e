"""Shared pytest fixtures: every test runs in its own tmp_path, offline, on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import modelutil
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("SKINFUSION_CACHE", str(tmp_path / "skinfusion-cache"))
    yield
    # Lightning never finishes a W&B run; close it so the next test's fit starts its own.
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture
def shared_data() -> Path:
    """The real data folder (`../shared/data`), from the SKINFUSION_DATA environment variable."""
    path = os.environ.get("SKINFUSION_DATA")
    if not path:
        pytest.skip("SKINFUSION_DATA is not set (it points at the real ISIC 2018 data; .ci/run sets it)")
    path = Path(path)
    if not path.is_dir():
        pytest.skip(f"SKINFUSION_DATA={path} is not a folder")
    return path


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def tiny_net():
    """Build the tiny test network: ``tiny_net(**overrides)``, ``tiny_net(seed, **overrides)`` (modelutil.TINY_NET)."""
    return modelutil.tiny_net


def pool_counts(root: Path) -> dict:
    """Counts of the ISIC 2018 pool at ``root``, read from its files directly (not through skinfusion's readers).

    The shared copy changes over time (DF and more VASC arrived on 2026-11-30), so the real-data tests compare
    the readers with these counts rather than with numbers written into the tests.
    """
    import csv

    task1 = sorted((root / "ISIC2018_Task1-2_Training_Input").glob("ISIC_*.jpg"))
    task3_images = sorted((root / "ISIC2018_Task3_Training_Input").glob("ISIC_*.jpg"))
    with open(root / "ISIC2018_Task3_Training_GroundTruth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [c for c in rows[0] if c != "image"]
    per_class = {c: sum(float(r[c]) == 1.0 for r in rows) for c in classes}
    with open(root / "ISIC2018_Task1_Training_Diagnosis.csv", newline="") as f:
        diagnosed = {r["image"] for r in csv.DictReader(f)}
    task1_ids = {p.stem for p in task1}
    masks3 = root / "HAM10000_segmentations_lesion_tschandl"
    return {
        "task1": len(task1),
        "task1_diagnosed": len(diagnosed & task1_ids),
        "task3": len(rows),
        "task3_images": len(task3_images),
        "task3_masks": sum((masks3 / f"{r['image']}_segmentation.png").is_file() for r in rows),
        "task3_per_class": per_class,
    }
