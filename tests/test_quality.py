"""A short real training on synthetic lesions must learn both tasks (a quality test, not a timed one)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from skinfusion.data import SkinFusionDataModule
from skinfusion.module import SkinFusionModule
from skinfusion.nn import SkinFusionNet

CHANCE_ACCURACY = 1 / 7


@pytest.mark.slow
def test_tiny_model_learns_segmentation_and_diagnosis():
    pl.seed_everything(0)
    data = SkinFusionDataModule(
        synthetic_samples=600, synthetic_size=64, image_size=64, batch_size=32, num_workers=2, normalization="unit"
    )
    net = SkinFusionNet("test_resnet", attention="cbam", decoder_channels=(16, 16, 8, 8, 8), num_classes=7)
    module = SkinFusionModule(net, optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-4))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # An untrained network sits near chance (1/7 accuracy) and, predicting noise, far below these.
    assert metrics["val/balanced_acc"] > 2.5 * CHANCE_ACCURACY, metrics
    assert metrics["val/acc"] > 2.5 * CHANCE_ACCURACY, metrics
    assert metrics["val/dice"] > 0.6, metrics
    assert metrics["val/jaccard"] > 0.45, metrics
