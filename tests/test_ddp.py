"""Two-process CPU DDP (gloo): training runs, and validation metrics equal those of one process."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed
from modelutil import TINY_CLI

from skinfusion.data.synthetic import synthetic_rows

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "base.yaml"
SAMPLES = 40

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _cli(command: str, save_dir: str, devices: int, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "skinfusion",
        command,
        *TINY_CLI,
        f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        "--trainer.enable_progress_bar=false",
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={save_dir}",
        "--trainer.callbacks=skinfusion.training.checkpointing.LastCheckpoint",
        f"--data.synthetic_samples={SAMPLES}",
        "--data.synthetic_size=32",
        "--data.image_size=32",
        "--data.batch_size=2",
        "--data.num_workers=0",
        *extra,
    ]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _val_metrics(save_dir: Path) -> dict[str, float]:
    (path,) = save_dir.glob("**/metrics.csv")
    values: dict[str, float] = {}
    for row in csv.DictReader(path.open()):
        values.update({k: float(v) for k, v in row.items() if k.startswith("val/") and v})
    return values


@pytest.mark.slow
def test_two_process_validation_equals_one_process(tmp_path):
    n_val = sum(row["split"] == "val" for row in synthetic_rows(SAMPLES, 0))
    assert n_val % 2 == 1  # odd: DistributedSampler would pad one sample, counting it twice
    _run(_cli("fit", "fit", 2, "--trainer.max_epochs=1"), tmp_path)
    (checkpoint,) = (tmp_path / "fit").glob("**/last.ckpt")
    _run(_cli("validate", "ddp", 2, f"--ckpt_path={checkpoint}"), tmp_path)
    _run(_cli("validate", "single", 1, f"--ckpt_path={checkpoint}"), tmp_path)
    two, one = _val_metrics(tmp_path / "ddp"), _val_metrics(tmp_path / "single")
    assert {"val/loss", "val/dice", "val/accuracy", "val/balanced_accuracy", "val/auc"} <= one.keys()
    assert two.keys() == one.keys()
    for name, value in one.items():
        assert two[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
