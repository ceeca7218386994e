"""A learning-rate schedule that follows the run's length: linear warm-up, then cosine decay to the end.

:class:`~skinfusion.training.module.SkinFusionModule` binds it to the Trainer's optimiser steps
(``trainer.estimated_stepping_batches``) and, with ``max_time``, to the training time; the run's progress is
the larger fraction, so the schedule ends when the run ends, whichever limit stops it. Progress by time depends
on the machine's speed: set ``max_epochs`` (keeping ``max_time`` as a cap) for reproducible runs.

References: Loshchilov & Hutter, SGDR, ICLR 2017 (cosine decay); Goyal et al., 2017 (linear warm-up).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["WarmupCosine"]


class WarmupCosine(LRScheduler):
    """Linear warm-up over the first ``warmup`` of the run, then cosine decay to ``min_lr_ratio`` at its end.

    ``lr(p) = base_lr * p / warmup`` for ``p < warmup``, else
    ``base_lr * (min_lr_ratio + (1 - min_lr_ratio) * (1 + cos(pi * (p - warmup) / (1 - warmup))) / 2)``, where
    ``p`` in [0, 1] is the run's progress. Step it every optimiser step (the module does so for this class).

    Args:
        warmup: fraction of the run spent warming up, in [0, 1).
        min_lr_ratio: final learning rate as a fraction of the initial one, in [0, 1].
        total_steps: optimiser steps of the whole run; ``None`` until :meth:`bind` (or the module) sets it.
        last_epoch: PyTorch's resume index (steps already taken).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: float = 0.05,
        min_lr_ratio: float = 0.01,
        total_steps: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"warmup must be in [0, 1), got {warmup}")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.warmup = warmup
        self.min_lr_ratio = min_lr_ratio
        self.total_steps = total_steps
        self._time_fraction: Callable[[], float] | None = None
        super().__init__(optimizer, last_epoch)

    def bind(self, total_steps: float, time_fraction: Callable[[], float] | None = None) -> None:
        """Set the run's length: its optimiser steps (``inf`` if unbounded) and a clock of its time budget.

        Raises:
            ValueError: neither limit is finite (nothing to decay towards).
        """
        if math.isinf(total_steps) and time_fraction is None:
            raise ValueError(
                "WarmupCosine needs the run's length: set trainer.max_epochs, max_steps or max_time"
                " (max_epochs=-1 with no max_time never ends)"
            )
        self.total_steps = None if math.isinf(total_steps) else max(int(total_steps), 1)
        self._time_fraction = time_fraction

    def progress(self) -> float:
        """The run's progress in [0, 1]: the larger of its step and time fractions."""
        fractions = [0.0]
        if self.total_steps is not None:
            fractions.append(self.last_epoch / self.total_steps)
        if self._time_fraction is not None:
            fractions.append(self._time_fraction())
        return min(max(fractions), 1.0)

    def factor(self, progress: float) -> float:
        """The learning rate at ``progress``, as a fraction of the initial learning rate."""
        if progress < self.warmup:
            return (progress + 1e-3) / (self.warmup + 1e-3)
        decay = (progress - self.warmup) / (1.0 - self.warmup)
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * decay))

    def get_lr(self) -> list[float]:
        scale = self.factor(self.progress())
        return [base_lr * scale for base_lr in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        # The clock is rebound by the module on resume; it is not state (and would not pickle).
        return {k: v for k, v in super().state_dict().items() if k != "_time_fraction"}
