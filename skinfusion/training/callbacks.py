"""Lightning callbacks shipped with skinfusion."""

from __future__ import annotations

import logging
import math

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from skinfusion import allocator

__all__ = ["ISICTestReport", "MallocTuning", "MetricsSummary"]

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


class MallocTuning(pl.Callback):
    """Keep freed CPU memory for reuse between steps (glibc): no page-fault churn, faster CPU steps.

    Calls :func:`skinfusion.allocator.tune_malloc` when a run is set up (before the loader workers start, so
    forked workers inherit it). Measured with ``python benchmarks/bench_allocator.py``: the same training
    step 1.1-1.2x faster on CPU with bit-identical results; the process keeps its peak memory instead of
    returning it to the kernel between steps. Nothing happens on non-glibc systems or where the allocator is
    configured through the environment. Remove the callback from the config to keep glibc's defaults.

    Args:
        mmap_threshold: bytes; see :func:`~skinfusion.allocator.tune_malloc`.
        trim_threshold: bytes; see :func:`~skinfusion.allocator.tune_malloc`.
    """

    def __init__(
        self,
        mmap_threshold: int = allocator.DEFAULT_MMAP_THRESHOLD,
        trim_threshold: int = allocator.DEFAULT_TRIM_THRESHOLD,
    ) -> None:
        allocator.check_thresholds(mmap_threshold, trim_threshold)  # at config parsing, not when the run starts
        self.mmap_threshold = mmap_threshold
        self.trim_threshold = trim_threshold
        self.applied = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.applied = allocator.tune_malloc(self.mmap_threshold, self.trim_threshold)


class ISICTestReport(pl.Callback):
    """After ``skinfusion test``: the official ISIC metrics at the original image resolution, and a report.

    The ``test/...`` metrics of the test loop are computed at the training resolution. This callback then
    predicts the DataModule's test split again from the original files (a prepared manifest's
    ``orig_image``/``orig_mask``), resizes the masks back to each image's own size, and scores them with
    :mod:`skinfusion.evaluation.isic` (identical to the official ISIC scorer). It writes the evaluation report
    of :func:`skinfusion.evaluation.report.evaluate` (``metrics.json``, ``per_class.md``, confusion matrix, ROC
    curves, worst segmentations) and logs the scalars as ``test_isic/<metric>``.

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
        from pathlib import Path

        from skinfusion.evaluation.report import evaluate
        from skinfusion.inference.predictor import Predictor

        datamodule = trainer.datamodule
        manifest = getattr(datamodule, "manifest", None)
        if manifest is None and getattr(datamodule, "root", None) is not None:
            manifest = Path(datamodule.root) / "manifest.csv"
        if manifest is None:
            print("ISICTestReport: the DataModule has no manifest; skipped", flush=True)
            return
        predictor = Predictor(
            pl_module,
            image_size=datamodule.image_size,
            normalization=datamodule.normalization,
            device=pl_module.device,
            batch_size=datamodule.batch_size,
            tta=self.tta,
            class_names=getattr(pl_module, "class_names", None),
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
        lines = [f"ISIC metrics at the original resolution (test split), report in {out_dir}:"]
        lines += [f"  {k:<24}  {self.metrics[k]:.4f}" for k in keys if k in self.metrics]
        print("\n".join(lines), flush=True)
