"""Shared pytest fixtures: every test runs in its own tmp_path, offline, on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
