"""A short real training on synthetic lesions must learn both tasks (a quality test, not a timed one)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from skinfusion.data import SkinFusionDataModule
from skinfusion.training.module import SkinFusionModule

CHANCE_ACCURACY = 1 / 7


@pytest.mark.slow
def test_tiny_model_learns_segmentation_and_diagnosis(tiny_net):
    pl.seed_everything(0)
    data = SkinFusionDataModule(
        synthetic_samples=600, synthetic_size=64, image_size=64, batch_size=32, num_workers=2, normalization="unit"
    )
    net = tiny_net(num_classes=7)
    epochs = 6
    # The cosine decay matters: with a constant rate the BatchNorm running statistics of this tiny net lag the
    # weights and the eval-mode metrics swing from seed to seed (measured: Dice 0.44-0.84 over 3 seeds).
    module = SkinFusionModule(
        net,
        optimizer=lambda p: torch.optim.AdamW(p, lr=2e-3, weight_decay=1e-4),
        scheduler=lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs),
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    # An untrained network sits near chance (1/7 accuracy) and far below these Dice/Jaccard values; over
    # seeds 0-2 this run reached balanced accuracy 0.70-0.74, accuracy 0.69-0.73, Dice 0.79-0.81.
    assert metrics["val/balanced_accuracy"] > 3 * CHANCE_ACCURACY, metrics
    assert metrics["val/accuracy"] > 3 * CHANCE_ACCURACY, metrics
    assert metrics["val/dice"] > 0.7, metrics
    assert metrics["val/jaccard"] > 0.55, metrics
