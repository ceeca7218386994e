"""Lightning callbacks shipped with skinfusion."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

__all__ = ["ISICTestReport", "MetricsSummary"]

log = logging.getLogger(__name__)

_SUMMARY_KEYS = (
    "loss",
    "dice",
    "jaccard",
    "threshold_jaccard",
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "auc",
    "image_only/balanced_accuracy",
)


class MetricsSummary(pl.Callback):
    """Print a short table of the final metrics at the end of fit, validate and test.

    Args:
        keys: metric names (without the stage prefix) to print, in order; missing ones are skipped.
    """

    def __init__(self, keys: tuple[str, ...] = _SUMMARY_KEYS) -> None:
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


class ISICTestReport(pl.Callback):
    """After ``skinfusion test``: the official ISIC metrics at the original image resolution, and a report.

    The test loop's ``test/...`` metrics are at the training resolution. This callback predicts the test split
    again from the manifest's original files, scores it as the official ISIC scorer does, writes the report of
    :func:`skinfusion.evaluation.report.evaluate` and logs its scalars as ``test_isic/<metric>``.

    Args:
        out_dir: report folder; default ``<log dir>/test_report``.
        worst: images in the worst-segmentation gallery.
        tta: flip test-time augmentation for the re-prediction.
    """

    def __init__(self, out_dir: str | None = None, worst: int = 8, tta: bool = False) -> None:
        self.out_dir = out_dir
        self.worst = worst
        self.tta = tta
        self.metrics: dict[str, float] = {}

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        from skinfusion.data.datamodule import SkinFusionDataModule
        from skinfusion.evaluation.report import evaluate
        from skinfusion.inference.predictor import Predictor

        datamodule = trainer.datamodule
        if not isinstance(datamodule, SkinFusionDataModule):
            print("ISICTestReport: the DataModule is not a SkinFusionDataModule (no manifest); skipped", flush=True)
            return
        manifest = datamodule.manifest or Path(datamodule.root) / "manifest.csv"
        # The module's inference record holds the DataModule's input size and normalisation (see its setup).
        predictor = Predictor(
            pl_module,
            device=pl_module.device,
            batch_size=datamodule.batch_size,
            tta=self.tta,
            progress=trainer.progress_bar_callback is not None,
        )
        out_dir = Path(self.out_dir or Path(trainer.log_dir or trainer.default_root_dir) / "test_report")
        metrics = evaluate(predictor, manifest, out_dir, worst=self.worst, split="test")
        self.metrics = {
            k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        for logger in trainer.loggers:
            logger.log_metrics({f"test_isic/{k}": v for k, v in self.metrics.items()}, step=trainer.global_step)
        keys = ("task1/threshold_jaccard", "task1/jaccard", "task1/dice", "task3/balanced_accuracy")
        keys += ("task3_image_only/balanced_accuracy",)  # metadata withheld (a network that reads it)
        lines = [f"ISIC metrics at the original resolution (test split), report in {out_dir}:"]
        lines += [f"  {k:<24}  {self.metrics[k]:.4f}" for k in keys if k in self.metrics]
        print("\n".join(lines), flush=True)
