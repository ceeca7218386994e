"""Crash safety: a SIGKILLed fit resumes exactly; checkpoints are written atomically."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from modelutil import TINY_CLI

from skinfusion.io import load_checkpoint
from skinfusion.training.checkpointing import AtomicCheckpointIO

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "base.yaml"

# 40 synthetic images -> 29 train (7 batches of 4), 5 val; 2 epochs = 14 steps; last.ckpt every step.
STEPS_PER_EPOCH = 7
EPOCHS = 2
TINY_CONFIG = f"""
trainer:
  accelerator: cpu
  devices: 1
  max_epochs: {EPOCHS}
  deterministic: true
  log_every_n_steps: 1
  enable_progress_bar: false
  logger:
    - class_path: pytorch_lightning.loggers.CSVLogger
      init_args: {{save_dir: runs, name: resume}}
  callbacks:
    - class_path: pytorch_lightning.callbacks.ModelCheckpoint
      init_args: {{monitor: val/loss, mode: min, save_top_k: 1}}
    - class_path: skinfusion.training.checkpointing.LastCheckpoint
      init_args: {{every_n_train_steps: 1}}
model:
  net:
    init_args: {{encoder: test_resnet, decoder_channels: [16, 16, 8, 8, 8], dropout: 0.3}}
data:
  synthetic_samples: 40
  synthetic_size: 64
  image_size: 64
  batch_size: 4
  num_workers: 1
  color_jitter: 0.2
"""


def _command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "skinfusion", "fit", "--config", str(BASE), "--config", str(config), *extra]


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def _lasts(folder: Path) -> list[Path]:
    return sorted(folder.glob("runs/resume/version_*/checkpoints/last.ckpt"))


def _final_metrics(folder: Path) -> dict[str, str]:
    metrics = sorted(folder.glob("runs/resume/version_*/metrics.csv"))[-1]
    rows = list(csv.DictReader(metrics.open()))
    last_epoch = max(int(r["epoch"]) for r in rows if r["epoch"])
    merged: dict[str, str] = {}
    for row in rows:
        if row["epoch"] and int(row["epoch"]) == last_epoch:
            merged.update({k: v for k, v in row.items() if v and (k.startswith("val/") or k.endswith("_epoch"))})
    return merged


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    straight.mkdir()
    killed.mkdir()

    _run(_command(config), straight)
    (reference,) = _lasts(straight)
    reference_ckpt = load_checkpoint(reference)
    assert reference_ckpt["global_step"] == EPOCHS * STEPS_PER_EPOCH

    # Kill at a random point after the checkpoint of step `target` has appeared (any epoch but the last).
    target = random.Random().randint(1, (EPOCHS - 1) * STEPS_PER_EPOCH)
    proc = subprocess.Popen(_command(config), cwd=killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    step = 0
    while step < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        lasts = _lasts(killed)
        if lasts:
            try:
                step = load_checkpoint(lasts[0])["global_step"]
            except Exception:  # being replaced this instant
                continue
    assert proc.poll() is None, f"the run ended before step {target}: {proc.stderr.read().decode()[-3000:]}"
    time.sleep(random.Random().uniform(0.0, 0.3))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    (interrupted,) = _lasts(killed)
    interrupted_step = load_checkpoint(interrupted)["global_step"]  # intact despite the kill
    assert target <= interrupted_step < EPOCHS * STEPS_PER_EPOCH

    _run(_command(config, "--ckpt_path", "last"), killed)
    resumed = _lasts(killed)[-1]
    assert resumed != interrupted
    resumed_ckpt = load_checkpoint(resumed)
    assert resumed_ckpt["global_step"] == reference_ckpt["global_step"]
    state, expected = resumed_ckpt["state_dict"], reference_ckpt["state_dict"]
    assert state.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, f"killed after step {interrupted_step}: {len(different)} tensors differ, e.g. {different[:3]}"
    assert _final_metrics(killed) == _final_metrics(straight)


_SAVER = """
import sys, torch
from skinfusion.training.checkpointing import AtomicCheckpointIO
io = AtomicCheckpointIO()
for i in range(1000):
    io.save_checkpoint({"version": i, "weights": torch.full((4_000_000,), float(i))}, sys.argv[1])
"""


def test_kill_during_save_leaves_last_checkpoint_intact(tmp_path):
    target = tmp_path / "last.ckpt"
    proc = subprocess.Popen([sys.executable, "-c", _SAVER, str(target)], stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        # Wait until a later save is in progress (its temporary file exists), then kill mid-write.
        while time.monotonic() < deadline and proc.poll() is None:
            if target.exists() and any(tmp_path.glob(".last.ckpt.*.tmp")):
                break
            time.sleep(0.001)
        time.sleep(random.Random().uniform(0.0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stderr.close()
    checkpoint = AtomicCheckpointIO().load_checkpoint(target)
    assert torch.equal(checkpoint["weights"], torch.full((4_000_000,), float(checkpoint["version"])))


def test_save_does_not_touch_target_until_complete(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, target)
    before = target.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # a kill-like interruption inside torch.save

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_cli_trainer_uses_atomic_checkpoint_io_and_rng_callback(tmp_path):
    from skinfusion.cli import SkinFusionCLI
    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.training.checkpointing import RNGStateCheckpoint
    from skinfusion.training.module import SkinFusionModule

    cli = SkinFusionCLI(
        SkinFusionModule,
        SkinFusionDataModule,
        run=False,
        args=[
            *TINY_CLI,
            "--trainer.logger=false",
            "--data.synthetic_samples=20",
        ],
    )
    assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert sum(isinstance(c, RNGStateCheckpoint) for c in cli.trainer.callbacks) == 1
    intervals = [c for c in cli.trainer.checkpoint_callbacks if c._every_n_train_steps > 0]
    assert intervals
    assert all(c.save_last for c in intervals)


def _nan_run(tmp_path: Path, nonfinite: str) -> None:
    from skinfusion.cli import main

    main(
        [
            "fit",
            *TINY_CLI,
            "--model.optimizer.init_args.lr=1e30",  # the first step blows the weights up; later losses are NaN/Inf
            f"--model.nonfinite_loss={nonfinite}",
            "--trainer.max_epochs=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
            f"--trainer.logger.save_dir={tmp_path / 'runs'}",
            "--trainer.callbacks=skinfusion.training.checkpointing.LastCheckpoint",
            "--trainer.callbacks.every_n_train_steps=1",
            "--data.synthetic_samples=24",
            "--data.synthetic_size=32",
            "--data.image_size=32",
            "--data.batch_size=4",
            "--data.num_workers=0",
        ]
    )


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    from skinfusion.training.module import SkinFusionModule

    with pytest.raises(SystemExit) as exit_info:
        _nan_run(tmp_path, "raise")
    assert exit_info.value.code == 2
    assert "non-finite training loss" in capsys.readouterr().err
    (last,) = tmp_path.glob("runs/**/last.ckpt")
    checkpoint = load_checkpoint(last)
    assert checkpoint["global_step"] >= 1  # the steps before the NaN were saved...
    module = SkinFusionModule.from_checkpoint(str(last))  # ...and the file is intact and loadable
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_nonfinite_loss_skip_option_finishes(tmp_path, caplog):
    with caplog.at_level("WARNING", logger="skinfusion.training.module"):
        _nan_run(tmp_path, "skip")
    assert "skipping step" in caplog.text
    (last,) = tmp_path.glob("runs/**/last.ckpt")
    assert load_checkpoint(last)["epoch"] == 0
