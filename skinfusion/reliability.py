"""Crash-safe checkpoints, exact resumption, determinism and distributed evaluation.

A killed ``skinfusion fit`` resumed with ``--ckpt_path last`` ends with the same weights as a run
that was never interrupted (bitwise on CPU with ``trainer.deterministic=true``). That takes four
pieces, each here:

* :class:`AtomicCheckpointIO` writes every checkpoint to a temporary file, ``fsync``\\ s it and
  renames it over the target, so a kill during a save never leaves a truncated ``last.ckpt``; it
  loads checkpoints with ``torch.load(weights_only=True)`` (no arbitrary unpickling), which covers
  Lightning's own resume path.
* :class:`ResumableSampler` makes the training order a pure function of ``(seed, epoch)`` and can
  start part-way through an epoch, so a resumed run sees exactly the batches it had not yet seen
  (Lightning restores its loop counters but not a shuffling DataLoader's position).
* :class:`EpochSeededDataset` reseeds the augmentation of every sample from ``(seed, epoch, index)``,
  so augmentation depends neither on the worker that loads a sample nor on what it loaded before.
* :class:`RNGStateCheckpoint` stores the global random states (torch, numpy, ``random``, CUDA) in
  the checkpoint and puts them back before the first resumed step (dropout draws continue as if
  never interrupted); Lightning does not save them.

:class:`UnpaddedDistributedSampler` shards evaluation data over processes without the padding of
``DistributedSampler`` (which would count some samples twice in the validation metrics).
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from torch.utils.data import Dataset, DistributedSampler

from skinfusion.errors import WeightsError
from skinfusion.io import atomic_save, load_checkpoint

__all__ = [
    "AtomicCheckpointIO",
    "EpochSeededDataset",
    "LastCheckpoint",
    "RNGStateCheckpoint",
    "ResumableSampler",
    "UnpaddedDistributedSampler",
    "distributed_world",
    "find_last_checkpoint",
    "mixed_seed",
    "resume_position",
]

log = logging.getLogger(__name__)


def mixed_seed(*values: int) -> int:
    """A 32-bit seed that depends on every value (``numpy.random.SeedSequence`` mixing)."""
    return int(np.random.SeedSequence([int(v) % 2**63 for v in values]).generate_state(1)[0])


def distributed_world(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """``(world_size, rank)`` of the initialised process group, or ``(1, 0)`` without one; given values win."""
    initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if num_replicas is None:
        num_replicas = torch.distributed.get_world_size() if initialised else 1
    if rank is None:
        rank = torch.distributed.get_rank() if initialised else 0
    if num_replicas < 1 or not 0 <= rank < num_replicas:
        raise ValueError(f"invalid rank {rank} for a world of {num_replicas} process(es)")
    return num_replicas, rank


# ---------------------------------------------------------------------------------------------- checkpoints


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that saves atomically and loads without unpickling arbitrary objects.

    Saving: ``torch.save`` into a temporary file beside the target, ``fsync``, ``os.replace`` over
    the target, ``fsync`` of the folder. A process killed at any moment leaves either the previous
    file or the new one, never a truncated mix.

    Loading: :func:`skinfusion.io.load_checkpoint` (``torch.load(weights_only=True)``), which refuses
    a pickle that would build any object other than tensors and plain containers and raises
    :class:`~skinfusion.errors.WeightsError` naming the file. Lightning passes the ``weights_only``
    argument of ``Trainer.fit/validate/test/predict`` through; only an explicit ``False`` there (for a
    checkpoint you trust) falls back to full unpickling.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options, got {storage_options!r}")
        path = Path(path)
        atomic_save(checkpoint, path)
        _fsync_dir(path.parent)

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
    """Keep ``last.ckpt`` fresh: every ``every_n_train_steps`` steps and at the end of every epoch.

    The resume point of ``fit --ckpt_path last``: at most ``every_n_train_steps`` steps of work are
    lost to a crash, and after training it holds the final state. (A plain ``ModelCheckpoint``
    with ``save_last=True`` and a ``monitor`` rewrites ``last.ckpt`` at an epoch's end only when the
    metric improved.) Let other checkpoint callbacks keep ``save_last`` off, so that one writer
    owns the file.

    Args:
        every_n_train_steps: steps between saves (``0``: only at the end of epochs).
        dirpath: folder (default: the logger's ``.../checkpoints``, as ``ModelCheckpoint``).
        filename: file name of the checkpoint, without ``.ckpt``.
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

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called after the epoch's validation: the checkpoint carries its results (best score, early stopping).
        from pytorch_lightning.trainer.states import TrainerFn

        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the epoch-end save above replaces ModelCheckpoint's


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_last_checkpoint(trainer: pl.Trainer) -> str | None:
    """The newest ``last*.ckpt`` a rerun of the same configuration should resume from.

    Lightning's ``ckpt_path="last"`` only looks in the *current* run's checkpoint folder, which
    with a versioned logger (``version_N``) is a new, empty folder. This also looks in the sibling
    versions of the logger's folder (``save_dir/name/*/checkpoints``) and in every
    :class:`ModelCheckpoint`'s own ``dirpath``, and returns the most recently modified file.
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


def _numpy_state_to_tensors(state: tuple) -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = state
    return {
        "name": name,
        "keys": torch.from_numpy(np.asarray(keys, np.int64)),
        "pos": int(pos),
        "gauss": (int(has_gauss), float(gauss)),
    }


def _numpy_state_from_tensors(state: dict[str, Any]) -> tuple:
    has_gauss, gauss = state["gauss"]
    return (state["name"], state["keys"].numpy().astype(np.uint32), state["pos"], has_gauss, gauss)


def collect_rng_states() -> dict[str, Any]:
    """The global random states as tensors and plain values (loadable with ``weights_only=True``)."""
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore states from :func:`collect_rng_states`."""
    torch.set_rng_state(states["torch"])
    np.random.set_state(_numpy_state_from_tensors(states["numpy"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class RNGStateCheckpoint(Callback):
    """Save the global random states in every checkpoint and restore them when training resumes.

    The states are those of the moment the checkpoint is written (e.g. after training step ``k``);
    they are restored just before the first training batch after a resume, so whatever ran in
    between (loading, the sanity check) does not matter and step ``k + 1`` draws the same dropout
    masks as in an uninterrupted run. Each process stores its own states (keyed by rank).
    """

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rank": _global_rank(), "states": collect_rng_states()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("rank", 0) != _global_rank():
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


def _global_rank() -> int:
    return distributed_world()[1]


# ---------------------------------------------------------------------------------------------- data order


class ResumableSampler(DistributedSampler):
    """Training sampler whose order is a pure function of ``(seed, epoch)``, resumable mid-epoch.

    Every epoch draws a fresh order from a generator seeded with ``(seed, epoch)``: a permutation
    (``shuffle``), a weighted draw with replacement (``weights``: class-balanced sampling) or the
    identity. Under DDP the order is padded (or cut, ``drop_last``) to a multiple of the world size
    and rank ``r`` takes every ``world``-th index from ``r``, exactly as ``DistributedSampler``; it
    subclasses it so that Lightning uses it as it is instead of wrapping it.

    ``start`` skips the first ``start`` indices of this rank's order, once (the next iteration
    only): a resumed run passes the number of samples it had already consumed in the epoch.

    Args:
        length: size of the dataset.
        shuffle: draw a random permutation each epoch (else the identity order).
        seed: seed of the order.
        weights: per-sample weights for sampling with replacement (overrides ``shuffle``).
        num_replicas: number of processes (default: the process group's size, 1 without one).
        rank: this process's rank (default: from the process group, 0 without one).
        drop_last: cut the order to a multiple of the world size instead of padding it.
        epoch: the epoch of the first iteration.
        start: indices of this rank's order to skip on the first iteration.
        with_epoch: yield ``(epoch, index)`` pairs (for :class:`EpochSeededDataset`) instead of indices.
    """

    def __init__(
        self,
        length: int,
        shuffle: bool = True,
        seed: int = 0,
        weights: Sequence[float] | torch.Tensor | None = None,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
        epoch: int = 0,
        start: int = 0,
        with_epoch: bool = False,
    ) -> None:
        # DistributedSampler.__init__ needs a dataset and a process group; set its attributes directly.
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.num_replicas, self.rank = distributed_world(num_replicas, rank)
        self.length = length
        self.dataset = range(length)
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = epoch
        self.with_epoch = with_epoch
        self.weights = None
        if weights is not None:
            self.weights = torch.as_tensor(weights, dtype=torch.float64)
            if self.weights.shape != (length,) or (self.weights < 0).any() or self.weights.sum() <= 0:
                raise ValueError(f"weights must be {length} non-negative numbers with a positive sum")
        if drop_last and length % self.num_replicas:
            self.num_samples = length // self.num_replicas
        else:
            self.num_samples = math.ceil(length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self._start = start

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next iteration (a pending ``start`` only applies to its own epoch)."""
        if epoch != self.epoch:
            self._start = 0
        self.epoch = epoch

    def skip(self, count: int) -> None:
        """Skip the first ``count`` indices of this rank's order on the next iteration."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self._start = count

    def order(self, epoch: int) -> list[int]:
        """This rank's full order of ``epoch`` (nothing skipped)."""
        generator = torch.Generator().manual_seed(mixed_seed(self.seed, epoch))
        if self.weights is not None:
            indices = torch.multinomial(self.weights, self.length, replacement=True, generator=generator).tolist()
        elif self.shuffle:
            indices = torch.randperm(self.length, generator=generator).tolist()
        else:
            indices = list(range(self.length))
        if self.total_size > len(indices) and indices:
            padding = self.total_size - len(indices)
            indices += (indices * math.ceil(padding / len(indices)))[:padding]
        indices = indices[: self.total_size]
        return indices[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[Any]:
        epoch, start = self.epoch, self._start
        self._start = 0
        for index in self.order(epoch)[start:]:
            yield (epoch, index) if self.with_epoch else index

    def __len__(self) -> int:
        # The full epoch, also when resuming: Lightning sizes the epoch from this.
        return self.num_samples


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler for several processes that visits every sample exactly once.

    Rank ``r`` of ``w`` gets indices ``r, r + w, r + 2w, ...``: ranks may differ by one sample, and
    no sample is repeated (``DistributedSampler`` pads with repeats, which biases metrics that are
    gathered over ranks). Metric states are then summed over ranks (torchmetrics, and Lightning's
    ``sync_dist`` weighted by batch size), giving the single-process values.

    Args:
        length: size of the dataset.
        num_replicas: number of processes (default: from the process group).
        rank: this process's rank (default: from the process group).
    """

    def __init__(self, length: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        self.num_replicas, self.rank = distributed_world(num_replicas, rank)
        self.dataset = range(length)
        self.length = length
        self.shuffle = False
        self.seed = 0
        self.epoch = 0
        self.drop_last = False
        self.num_samples = len(range(self.rank, length, self.num_replicas))
        self.total_size = length

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.length, self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples


class EpochSeededDataset(Dataset):
    """Wrap a dataset so that sample ``index`` of epoch ``epoch`` is augmented with seed ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs (from ``ResumableSampler(with_epoch=True)``) or plain indices
    (epoch 0). Before each item the wrapped dataset's ``transform`` is reseeded (albumentations'
    ``Compose.set_random_seed``), so a sample's augmentation does not depend on which DataLoader
    worker loads it or what that worker loaded before: runs with any number of workers, and a
    resumed run, see identical batches. Other attributes are those of the wrapped dataset.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        transform = getattr(self.dataset, "transform", None)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(mixed_seed(self.seed, epoch, index))
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed"):  # not yet set (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def resume_position(trainer: pl.Trainer | None, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches already done in it)`` where a (possibly resumed) fit continues.

    Called when the training DataLoader is built. On a fresh run it is ``(current epoch, 0)``; on a
    run restored from a mid-epoch checkpoint it is the checkpoint's epoch and the number of batches
    it had consumed; a checkpoint written after the last batch of an epoch continues with the next
    epoch from its start (as Lightning's loops do).

    Args:
        trainer: the trainer (``None``: outside a fit, ``(0, 0)``).
        batches_per_epoch: batches of a full epoch on this rank (after ``limit_train_batches``).
    """
    if trainer is None:
        return 0, 0
    fit_loop = trainer.fit_loop
    epoch = fit_loop.epoch_progress.current.processed
    if not fit_loop.restarting:
        return epoch, 0
    done = fit_loop.epoch_loop.batch_progress.current.ready
    if batches_per_epoch > 0 and done >= batches_per_epoch:
        return epoch + 1, 0
    return epoch, done


def batches_per_epoch(trainer: pl.Trainer | None, loader_length: int) -> int:
    """Batches Lightning will run per epoch for a loader of ``loader_length`` batches (``limit_train_batches``)."""
    limit = getattr(trainer, "limit_train_batches", None) if trainer is not None else None
    if limit is None:
        return loader_length
    if isinstance(limit, int):
        return min(loader_length, limit)
    return int(loader_length * limit) if limit < 1.0 else loader_length
