"""EMA of the weights: the average by hand, what the checkpoint holds, and a resumed run that matches a straight one."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from skinfusion.training.ema import EMA, ema_decay


class _Line(pl.LightningModule):
    """One weight, plain SGD on a fixed gradient sequence; ``setup`` adds a buffer (as the loss's priors are)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.seen: list[float] = []

    def setup(self, stage: str) -> None:
        self.register_buffer("prior", torch.tensor([3.0]))

    def training_step(self, batch, batch_idx):
        return (self.w * batch[0]).sum()  # gradient = the batch's value

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.seen.append(float(self.w.detach()))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)

    def train_dataloader(self):
        gradients = torch.tensor([[-1.0], [-2.0], [0.5], [-4.0], [1.0], [-3.0]])
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(gradients), batch_size=1)


def test_the_average_is_the_warmed_up_exponential_average_of_the_weights(tmp_path):
    """By hand: weights after the steps w_1..w_6 (SGD lr 1: w -= g), average a_1 = w_1,
    a_{n+1} = a_n + (w_{n+1} - a_n) * (1 - min(0.5, (1 + n) / (10 + n))); the module ends with the average."""
    module = _Line()
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[EMA(decay=0.5)],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module)
    weights = [1.0, 3.0, 2.5, 6.5, 5.5, 8.5]
    assert module.seen == pytest.approx(weights)
    average = weights[0]
    for n, w in enumerate(weights[1:], start=1):
        average += (w - average) * (1 - min(0.5, (1 + n) / (10 + n)))
    assert float(module.w) == pytest.approx(average)
    assert average != pytest.approx(weights[-1])
    trainer.save_checkpoint(tmp_path / "end.ckpt")
    checkpoint = torch.load(tmp_path / "end.ckpt", weights_only=True)
    assert float(checkpoint["state_dict"]["w"]) == pytest.approx(average)
    assert float(checkpoint["state_dict"]["prior"]) == 3.0  # what setup added is in the averaged checkpoint


def test_decay_warm_up_and_bad_decay():
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 90) == pytest.approx(91 / 100)
    assert ema_decay(0.999, 10**6) == 0.999
    assert ema_decay(0.999, 0, warmup=False) == 0.999
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(decay=1.0)
