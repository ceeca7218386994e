"""Lightning callbacks shipped with skinfusion."""

from __future__ import annotations

import math

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["MetricsSummary"]


class MetricsSummary(pl.Callback):
    """Print a short table of the final metrics at the end of fit, validate and test.

    Args:
        keys: metric names (without the stage prefix) to print, in order; missing ones are skipped.
    """

    def __init__(
        self,
        keys: tuple[str, ...] = (
            "loss",
            "dice",
            "jaccard",
            "jaccard_thresholded",
            "acc",
            "balanced_acc",
            "f1_macro",
            "auroc",
        ),
    ) -> None:
        self.keys = tuple(keys)

    def summary(self, trainer: pl.Trainer, stage: str) -> dict[str, float]:
        metrics = trainer.callback_metrics
        out = {}
        for key in self.keys:
            for name in (f"{stage}/{key}", f"{stage}/{key}_epoch"):
                if name in metrics:
                    out[key] = float(metrics[name])
                    break
        return out

    @rank_zero_only
    def _print(self, trainer: pl.Trainer, stage: str, title: str) -> None:
        values = self.summary(trainer, stage)
        if not values:
            return
        width = max(len(k) for k in values)
        lines = [f"{title} (epoch {trainer.current_epoch}, {trainer.global_step} steps):"]
        lines += [f"  {k:<{width}}  {v:.4f}" if math.isfinite(v) else f"  {k:<{width}}  {v}" for k, v in values.items()]
        print("\n".join(lines), flush=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, "val", "Final validation metrics")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._print(trainer, "val", "Validation metrics")

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._print(trainer, "test", "Test metrics")
