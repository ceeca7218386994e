"""An exponential moving average of the weights (Polyak averaging), validated, checkpointed and resumed.

Add it to a fit from the command line (it is off by default)::

    skinfusion fit ... --trainer.callbacks+=skinfusion.training.ema.EMA --trainer.callbacks.decay 0.998

Every optimiser step moves the average towards the weights, ``average += (1 - d) * (weights - average)``,
with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` updates (timm's ``ModelEmaV3`` warm-up: the first
weights, which are the worst, are forgotten fast; ``warmup=False``: ``d = decay``). ``1 / (1 - decay)`` steps
is the average's memory: keep it well under the run's length (0.998: 500 steps). Batch-norm statistics are
averaged with the weights.

Validation scores the average, and every checkpoint holds the average as its ``state_dict``, so ``evaluate``,
``predict``, ``export`` and a ``pretrained`` checkpoint use it unchanged; the weights being trained travel in
the checkpoint beside it (``current_model_state``, twice the size), and ``fit --ckpt_path`` resumes both.
Built on Lightning's :class:`~pytorch_lightning.callbacks.WeightAveraging` (pytorch-lightning >= 2.5), with
one change: the average is copied from the module only once the module's ``setup`` has run, so that what
``setup`` adds (the loss's class priors, from the training split) is in the averaged checkpoint too.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch import Tensor

try:
    from pytorch_lightning.callbacks import WeightAveraging
except ImportError as error:  # pragma: no cover - pytorch-lightning < 2.5
    raise ImportError(
        "skinfusion.training.ema.EMA needs pytorch-lightning >= 2.5 (WeightAveraging): pip install -U pytorch-lightning"
    ) from error

__all__ = ["EMA", "ema_decay"]


def ema_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of the update after ``updates`` earlier ones: ``min(decay, (1 + n) / (10 + n))`` with warm-up."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


class EMA(WeightAveraging):
    """Exponential moving average of the weights (module docstring).

    Args:
        decay: the average's decay per optimiser step, in (0, 1).
        warmup: forget the first weights fast (``min(decay, (1 + n) / (10 + n))``).
        use_buffers: average the buffers (batch-norm statistics) too; otherwise they are the current ones.
    """

    def __init__(self, decay: float = 0.998, warmup: bool = True, use_buffers: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=use_buffers, avg_fn=self._average)
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self._step_decay = self.decay  # this update's decay: computed once a step, not once a tensor

    def _average(self, averaged: Tensor, current: Tensor, num_averaged: Tensor) -> Tensor:
        if not averaged.is_floating_point():  # counters (batch norm's num_batches_tracked) follow the weights
            return current
        return averaged + (current - averaged) * (1.0 - self._step_decay)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._average_model is not None:
            self._step_decay = ema_decay(self.decay, int(self._average_model.n_averaged), self.warmup)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # Deferred: callbacks' setup runs before the module's, which registers the loss's class priors.
        pass

    def _ensure_average(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._average_model is None:
            super().setup(trainer, pl_module, "fit")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._ensure_average(trainer, pl_module)

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        if trainer.state.fn == "fit":
            self._ensure_average(trainer, pl_module)  # the module's setup has run: restoring follows it
        super().on_load_checkpoint(trainer, pl_module, checkpoint)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        super().on_save_checkpoint(trainer, pl_module, checkpoint)
        current = checkpoint.get("current_model_state")
        if current is not None:  # anything the average does not hold (none expected) keeps the current value
            for name, value in current.items():
                checkpoint["state_dict"].setdefault(name, value)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "decay": self.decay, "warmup": self.warmup}
