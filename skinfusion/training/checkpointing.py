"""Crash-safe checkpoints and exact resumption.

A killed ``skinfusion fit`` resumed with ``--ckpt_path last`` ends with the same weights and logs the same
metrics as a run that was never interrupted (bitwise on CPU with ``trainer.deterministic=true``; the module
keeps the epoch's training sums in its checkpoints). Besides the data order
(:mod:`skinfusion.data.sampling`) that takes atomic, safely loaded checkpoints (:class:`AtomicCheckpointIO`),
a fresh ``last.ckpt`` (:class:`LastCheckpoint`) and the random states, which Lightning does not save
(:class:`RNGStateCheckpoint`).
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from skinfusion.data.sampling import distributed_world
from skinfusion.errors import WeightsError
from skinfusion.io import atomic_save, load_checkpoint

__all__ = ["AtomicCheckpointIO", "LastCheckpoint", "RNGStateCheckpoint", "find_last_checkpoint"]

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that saves atomically (:func:`skinfusion.io.atomic_save`) and loads safely.

    Loading is :func:`skinfusion.io.load_checkpoint` (``weights_only=True``: a :class:`~skinfusion.errors.WeightsError`
    for a pickle that would build other objects), unless ``Trainer.fit/validate/test/predict`` get an explicit
    ``weights_only=False`` (for a checkpoint you trust).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            log.warning(
                "loading %s with weights_only=False: it may run code it contains; load only trusted files", path
            )
            return super().load_checkpoint(path, map_location=map_location, weights_only=False)
        checkpoint = load_checkpoint(path, map_location if map_location is not None else "cpu")
        if not isinstance(checkpoint, dict):
            raise WeightsError(f"{path}: not a Lightning checkpoint (a {type(checkpoint).__name__}, not a dict)")
        return checkpoint


class LastCheckpoint(ModelCheckpoint):
    """Keep ``last.ckpt`` fresh: every ``every_n_train_steps`` steps (``0``: never) and at the end of every epoch.

    (A plain ``ModelCheckpoint`` with ``save_last=True`` and a ``monitor`` rewrites ``last.ckpt`` at an epoch's
    end only when the metric improved.) Let other checkpoint callbacks keep ``save_last`` off, so that one
    writer owns the file. ``dirpath`` defaults to the logger's ``.../checkpoints``; ``filename`` has no ``.ckpt``.
    """

    def __init__(self, every_n_train_steps: int = 200, dirpath: str | None = None, filename: str = "last") -> None:
        if every_n_train_steps < 0:
            raise ValueError(f"every_n_train_steps must be >= 0, got {every_n_train_steps}")
        super().__init__(
            dirpath=dirpath,
            every_n_train_steps=every_n_train_steps or None,
            every_n_epochs=None if every_n_train_steps else 1,
            save_last=True,
            save_top_k=0,
            enable_version_counter=False,
        )
        self.CHECKPOINT_NAME_LAST = filename

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        # Not after an epoch's last batch: Lightning counts that epoch done, so a run killed in its end (validation,
        # the epoch's metrics) and resumed from here would skip that end. The epoch-end save below follows anyway.
        progress = trainer.fit_loop.epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.ready >= trainer.num_training_batches:
            return
        super().on_train_batch_end(trainer, pl_module, *args)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called after the epoch's validation: the checkpoint carries its results (best score, early stopping).
        from pytorch_lightning.trainer.states import TrainerFn

        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the epoch-end save above replaces ModelCheckpoint's


def find_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest ``last*.ckpt`` a rerun of the same configuration should resume from.

    Lightning's ``ckpt_path="last"`` only looks in the *current* run's checkpoint folder, which with a versioned
    logger is a new, empty one. This also looks in the sibling versions (``save_dir/name/*/checkpoints``) and in
    every :class:`ModelCheckpoint`'s ``dirpath``, and returns the most recently modified file.
    """
    folders: set[Path] = set()
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
            folders.add(Path(callback.dirpath))
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        base = Path(save_dir) / str(logger.name or "")
        if base.is_dir():
            folders.update(p / "checkpoints" for p in base.iterdir() if p.is_dir())
    else:
        folders.add(Path(trainer.default_root_dir) / "checkpoints")
    candidates = [
        p for folder in folders if folder.is_dir() for p in folder.glob("last*.ckpt") if not p.name.startswith(".")
    ]
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: (p.stat().st_mtime_ns, str(p))))


# ---------------------------------------------------------------------------------------------- random states


def collect_rng_states() -> dict[str, Any]:
    """The global random states as tensors and plain values (loadable with ``weights_only=True``)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    keys = torch.from_numpy(np.asarray(keys, np.int64))
    numpy_state = {"name": name, "keys": keys, "pos": int(pos), "gauss": (int(has_gauss), float(gauss))}
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states from :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    numpy_state = states["numpy"]
    keys = numpy_state["keys"].numpy().astype(np.uint32)
    np.random.set_state((numpy_state["name"], keys, numpy_state["pos"], *numpy_state["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(Callback):
    """Save the global random states in every checkpoint and restore them when training resumes.

    They are restored just before the first training batch after a resume, so whatever ran in between
    (loading, the sanity check) does not matter and the next step draws the same dropout masks as in an
    uninterrupted run. Each process stores its own states (keyed by rank).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rank": distributed_world()[1], "states": collect_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rank", 0) != distributed_world()[1]:
            # Lightning checkpoints hold rank 0's callback state; other ranks keep their own seeds.
            log.info("RNG states in the checkpoint are rank %s's; not restored here", state_dict.get("rank"))
            return
        self._pending = state_dict.get("states")

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            set_rng_states(self._pending)
            self._pending = None
