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
from typing import Any

import pytest
import torch
from modelutil import TINY_CLI

from skinfusion.io import load_checkpoint
from skinfusion.training.checkpointing import AtomicCheckpointIO
from skinfusion.training.module import SkinFusionModule

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


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def _lasts(folder: Path) -> list[Path]:
    return sorted(folder.glob("runs/resume/version_*/checkpoints/last.ckpt"))


def _epoch_metrics(folder: Path) -> dict[int, dict[str, str]]:
    """Every epoch's validation and epoch-level training metrics, over all the runs in ``folder`` (later win)."""
    merged: dict[int, dict[str, str]] = {}
    for metrics in sorted(folder.glob("runs/resume/version_*/metrics.csv")):
        for row in csv.DictReader(metrics.open()):
            if row["epoch"]:
                merged.setdefault(int(row["epoch"]), {}).update(
                    {k: v for k, v in row.items() if v and k.startswith(("val/", "train/")) and "_step" not in k}
                )
    return merged


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """An uninterrupted run of the tiny configuration: its folder and final checkpoint."""
    folder = tmp_path_factory.mktemp("straight")
    config = folder / "tiny.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    proc = _run(_command(config), folder)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (reference,) = _lasts(folder)
    checkpoint = load_checkpoint(reference)
    assert checkpoint["global_step"] == EPOCHS * STEPS_PER_EPOCH
    return folder, checkpoint


def _resume_and_compare(
    straight: tuple[Path, dict[str, Any]], killed: Path, config: Path, *, last_epoch_only: bool = False
) -> None:
    reference_folder, reference = straight
    (interrupted,) = _lasts(killed)
    proc = _run(_command(config, "--ckpt_path", "last"), killed)
    assert proc.returncode == 0, proc.stderr[-4000:]
    resumed = _lasts(killed)[-1]
    assert resumed != interrupted
    resumed_ckpt = load_checkpoint(resumed)
    assert resumed_ckpt["global_step"] == reference["global_step"]
    state, expected = resumed_ckpt["state_dict"], reference["state_dict"]
    assert state.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(state[k], expected[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    # The logged metrics too, the training epoch means over a resumed epoch included.
    got, want = _epoch_metrics(killed), _epoch_metrics(reference_folder)
    assert want[EPOCHS - 1]["train/loss_epoch"]
    assert want[EPOCHS - 1]["train/dice"]
    if last_epoch_only:  # a kill at a random instant may cut the killed run's metrics.csv mid-write
        got, want = got[EPOCHS - 1], want[EPOCHS - 1]
    assert got == want


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path, straight):
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    # Kill at a random point after the checkpoint of step `target` has appeared (any epoch but the last).
    target = random.Random().randint(1, (EPOCHS - 1) * STEPS_PER_EPOCH)
    proc = subprocess.Popen(_command(config), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    step = 0
    while step < target and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
        lasts = _lasts(tmp_path)
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
    (interrupted,) = _lasts(tmp_path)
    interrupted_step = load_checkpoint(interrupted)["global_step"]  # intact despite the kill
    assert target <= interrupted_step < EPOCHS * STEPS_PER_EPOCH
    _resume_and_compare(straight, tmp_path, config, last_epoch_only=True)


# A callback that SIGKILLs its process at a hook once `step` optimiser steps are done.
_KILLER = """
import os, signal
from pytorch_lightning.callbacks import Callback

class KillAt(Callback):
    def __init__(self, step: int, hook: str) -> None:
        self.step, self.hook = step, hook

    def _maybe_kill(self, trainer, hook):
        if hook == self.hook and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_start(self, trainer, *args):
        self._maybe_kill(trainer, "on_train_batch_start")

    def on_train_epoch_end(self, trainer, *args):
        self._maybe_kill(trainer, "on_train_epoch_end")
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("step", "hook", "saved_step"),
    [
        # Mid-epoch: the checkpoint holds the epoch's half-accumulated training metrics.
        (STEPS_PER_EPOCH + 2, "on_train_batch_start", STEPS_PER_EPOCH + 2),
        # In an epoch's end, after its validation: the resume redoes the epoch's last step, then its end (a
        # checkpoint of the last step would resume at the next epoch, and that epoch's metrics would be lost).
        (STEPS_PER_EPOCH, "on_train_epoch_end", STEPS_PER_EPOCH - 1),
    ],
    ids=["mid-epoch", "in-epoch-end"],
)
def test_kill_at_chosen_point_then_resume_matches_uninterrupted_run(tmp_path, straight, step, hook, saved_step):
    (tmp_path / "killer.py").write_text(_KILLER)
    config = tmp_path / "tiny.yaml"
    config.write_text(textwrap.dedent(TINY_CONFIG))
    kill = tmp_path / "kill.yaml"
    kill.write_text(
        f"trainer:\n  callbacks+:\n    - class_path: killer.KillAt\n      init_args: {{step: {step}, hook: {hook}}}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = _run([*_command(config), "--config", str(kill)], tmp_path, env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    (interrupted,) = _lasts(tmp_path)
    assert load_checkpoint(interrupted)["global_step"] == saved_step
    _resume_and_compare(straight, tmp_path, config)


EMA_CONFIG = TINY_CONFIG.replace(
    "  callbacks:\n", "  callbacks:\n    - class_path: skinfusion.training.ema.EMA\n      init_args: {decay: 0.9}\n", 1
)


@pytest.mark.slow
def test_ema_run_killed_mid_epoch_resumes_to_the_straight_runs_average(tmp_path):
    """With the weights' EMA on, a checkpoint holds the average as its state_dict (what evaluate and predict load),
    the loss's class priors included, and the trained weights beside it; a run killed mid-epoch and resumed ends
    with the same average, the same weights and the same logged metrics as a straight run."""
    straight_folder = tmp_path / "straight"
    straight_folder.mkdir()
    config = tmp_path / "ema.yaml"
    config.write_text(textwrap.dedent(EMA_CONFIG))
    proc = _run(_command(config), straight_folder)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (reference_path,) = _lasts(straight_folder)
    reference = load_checkpoint(reference_path)
    average, current = reference["state_dict"], reference["current_model_state"]
    assert average.keys() == current.keys()
    assert "loss.cls_loss.log_priors" in average
    assert not torch.equal(average["net.classifier.mlp.1.weight"], current["net.classifier.mlp.1.weight"])
    loaded = SkinFusionModule.from_checkpoint(reference_path)
    assert torch.equal(loaded.state_dict()["net.classifier.mlp.1.weight"], average["net.classifier.mlp.1.weight"])

    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "killer.py").write_text(_KILLER)
    kill = killed / "kill.yaml"
    step = STEPS_PER_EPOCH + 2
    kill.write_text(
        f"trainer:\n  callbacks+:\n    - class_path: killer.KillAt\n"
        f"      init_args: {{step: {step}, hook: on_train_batch_start}}\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(killed), os.environ.get("PYTHONPATH")]))}
    proc = _run([*_command(config), "--config", str(kill)], killed, env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    _resume_and_compare((straight_folder, reference), killed, config)
    resumed = load_checkpoint(_lasts(killed)[-1])
    different = [k for k in current if not torch.equal(resumed["current_model_state"][k], current[k])]
    assert not different, f"{len(different)} trained tensors differ, e.g. {different[:3]}"


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
