"""Lightning callbacks shipped with skinfusion."""

from __future__ import annotations

import logging
import math
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["MetricsSummary", "WandbConfig"]

log = logging.getLogger(__name__)


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


class WandbConfig(pl.Callback):
    """Record the resolved LightningCLI config in the W&B run's config.

    LightningCLI's ``SaveConfigCallback`` writes the resolved config to ``config.yaml`` in the log
    folder; this callback also puts it into the W&B run's config, under its top-level keys
    (``model``, ``data``, ``trainer``, ``seed_everything``, ...) next to the hyperparameters Lightning
    logs itself. (An online or synced run shows it as ``files/config.yaml``; an offline run keeps it
    in its ``.wandb`` log.) It does nothing without a W&B logger or outside
    LightningCLI. Checkpoint paths are recorded by :class:`skinfusion.loggers.WandbLogger`.
    """

    def __init__(self) -> None:
        self._logged = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._logged:
            self._log_config(trainer)
            self._logged = True

    @staticmethod
    def resolved_config(trainer: pl.Trainer) -> dict[str, Any] | None:
        """The config of the LightningCLI that built ``trainer`` as a plain dict, or ``None``."""
        import yaml
        from pytorch_lightning.cli import SaveConfigCallback

        saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
        if saver is None:
            return None
        try:
            return yaml.safe_load(saver.parser.dump(saver.config, skip_none=False))
        except Exception as err:  # a config that cannot be dumped must not stop training
            log.warning("WandbConfig: could not dump the CLI config (%s); only hyperparameters are logged", err)
            return None

    @rank_zero_only
    def _log_config(self, trainer: pl.Trainer) -> None:
        from skinfusion.visual import find_wandb_logger

        logger = find_wandb_logger(trainer)
        config = self.resolved_config(trainer) if logger is not None else None
        if config:
            logger.experiment.config.update(config, allow_val_change=True)
