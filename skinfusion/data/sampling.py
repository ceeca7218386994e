"""Samplers and a dataset wrapper that make the data order and augmentation reproducible and resumable.

Lightning restores its loop counters but not a shuffling DataLoader's position: the training order
here is a pure function of ``(seed, epoch)`` and can start part-way through an epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "EpochSeededDataset",
    "ResumableSampler",
    "UnpaddedDistributedSampler",
    "batches_per_epoch",
    "distributed_world",
    "mixed_seed",
    "resume_position",
]


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


class ResumableSampler(DistributedSampler):
    """Training sampler whose order is a pure function of ``(seed, epoch)``, resumable mid-epoch.

    Every epoch draws a fresh order from a generator seeded with ``(seed, epoch)``: a permutation
    (``shuffle``), a weighted draw with replacement (``weights``: class-balanced sampling) or the
    identity. Under DDP the order is padded (or cut, ``drop_last``) to a multiple of the world size
    and rank ``r`` takes every ``world``-th index from ``r``, exactly as ``DistributedSampler``; it
    subclasses it so that Lightning uses it as it is instead of wrapping it.

    Args:
        length: size of the dataset.
        weights: per-sample weights for sampling with replacement (overrides ``shuffle``).
        num_replicas: number of processes (default: the process group's size, 1 without one).
        rank: this process's rank (default: from the process group, 0 without one).
        epoch: the epoch of the first iteration.
        start: indices of this rank's order to skip on the first iteration only (a resumed run passes
            the number of samples it had already consumed in the epoch).
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
        self.num_samples = length // self.num_replicas if drop_last else math.ceil(length / self.num_replicas)
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


class UnpaddedDistributedSampler(ResumableSampler):
    """Evaluation sampler for several processes that visits every sample exactly once.

    Rank ``r`` of ``w`` gets indices ``r, r + w, r + 2w, ...``: ranks may differ by one sample, and
    no sample is repeated (``DistributedSampler`` pads with repeats, which biases metrics that are
    gathered over ranks). Metric states are then summed over ranks (torchmetrics, and Lightning's
    ``sync_dist`` weighted by batch size), giving the single-process values.
    """

    def __init__(self, length: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(length, shuffle=False, num_replicas=num_replicas, rank=rank)
        self.total_size = length  # no padding
        self.num_samples = len(range(self.rank, length, self.num_replicas))


class EpochSeededDataset(Dataset):
    """Wrap a dataset so that sample ``index`` of epoch ``epoch`` is augmented with seed ``(seed, epoch, index)``.

    Keys are ``(epoch, index)`` pairs (from ``ResumableSampler(with_epoch=True)``) or plain indices
    (epoch 0). Reseeding the wrapped dataset's ``transform`` before each item makes a sample's
    augmentation independent of the DataLoader worker that loads it, so runs with any number of
    workers, and a resumed run, see identical batches. Other attributes are those of the wrapped dataset.
    """

    def __init__(self, dataset: Dataset, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        transform = getattr(self.dataset, "transform", None)
        seed = mixed_seed(self.seed, epoch, index)
        if hasattr(transform, "set_random_seed"):
            transform.set_random_seed(seed)
        if hasattr(self.dataset, "set_random_seed"):  # the dataset's own draws (metadata withholding)
            self.dataset.set_random_seed(seed)
        return self.dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "seed"):  # not yet set (e.g. while unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)


def resume_position(trainer: pl.Trainer | None, batches_per_epoch: int) -> tuple[int, int]:
    """``(epoch, batches already done in it)`` where a (possibly resumed) fit continues.

    A run restored from a mid-epoch checkpoint continues the checkpoint's epoch after the batches it
    had consumed; one written after the last batch of an epoch continues with the next epoch (as
    Lightning's loops do). ``trainer=None`` (outside a fit) gives ``(0, 0)``; ``batches_per_epoch``
    counts a full epoch on this rank after ``limit_train_batches``.
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
