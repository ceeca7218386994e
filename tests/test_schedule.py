"""WarmupCosine: linear warm-up, cosine decay to the end of the run, whatever limit ends it."""

from __future__ import annotations

import io
import math

import pytest
import pytorch_lightning as pl
import torch

from skinfusion.training.schedule import WarmupCosine


def _scheduler(**kwargs) -> WarmupCosine:
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return WarmupCosine(optimizer, **kwargs)


def test_factor_warms_up_linearly_then_decays_to_the_floor():
    s = _scheduler(warmup=0.1, min_lr_ratio=0.05)
    assert s.factor(0.05) == pytest.approx((0.05 + 1e-3) / (0.1 + 1e-3))
    assert s.factor(0.1) == pytest.approx(1.0)
    assert s.factor(0.55) == pytest.approx(0.05 + 0.95 * 0.5)  # half-way through the decay: cos(pi/2) = 0
    assert s.factor(1.0) == pytest.approx(0.05)
    assert _scheduler(warmup=0.0).factor(0.0) == pytest.approx(1.0)


def test_progress_is_the_larger_of_steps_and_time():
    s = _scheduler()
    clock = {"fraction": 0.0}
    s.bind(total_steps=100, time_fraction=lambda: clock["fraction"])
    for _ in range(10):
        s.step()
    assert s.progress() == pytest.approx(0.1)
    clock["fraction"] = 0.6  # the time budget runs out faster than the steps
    assert s.progress() == pytest.approx(0.6)
    clock["fraction"] = 2.0
    assert s.progress() == 1.0
    s.bind(total_steps=math.inf, time_fraction=lambda: 0.25)  # max_epochs=-1 with max_time: time alone
    assert s.progress() == pytest.approx(0.25)


def test_a_run_without_an_end_is_refused():
    with pytest.raises(ValueError, match="max_epochs, max_steps or max_time"):
        _scheduler().bind(total_steps=math.inf)


@pytest.mark.parametrize(("kwargs", "message"), [({"warmup": 1.0}, "warmup"), ({"min_lr_ratio": 2}, "min_lr_ratio")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _scheduler(**kwargs)


def test_state_dict_leaves_the_clock_out_and_loads_safely():
    s = _scheduler()
    s.bind(total_steps=10, time_fraction=lambda: 0.0)
    s.step()
    buffer = io.BytesIO()
    torch.save(s.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    assert "_time_fraction" not in state
    assert state["total_steps"] == 10


class _RecordLR(pl.Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[-1]["lr"])


@pytest.mark.parametrize(("max_epochs", "limit_train_batches"), [(2, 5), (3, 4)])
def test_the_module_binds_it_to_the_trainers_length(tmp_path, max_epochs, limit_train_batches):
    from skinfusion import SkinFusionDataModule, SkinFusionModule, SkinFusionNet

    net = SkinFusionNet("test_resnet", decoder_channels=[32, 16, 16, 8, 8])
    module = SkinFusionModule(net, scheduler=lambda optimizer: WarmupCosine(optimizer, warmup=0.2, min_lr_ratio=0.0))
    data = SkinFusionDataModule(synthetic_samples=40, synthetic_size=32, image_size=32, batch_size=4, num_workers=0)
    record = _RecordLR()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=max_epochs,
        limit_train_batches=limit_train_batches,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, data)
    total = max_epochs * limit_train_batches
    base = module.trainer.optimizers[0].defaults["lr"]
    assert len(record.lrs) == total
    assert record.lrs[0] < 0.1 * base  # warming up
    assert max(record.lrs) == pytest.approx(base, rel=0.1)
    # The last step runs at progress (total - 1) / total: nearly the end of the cosine.
    expected_last = base * 0.5 * (1 + math.cos(math.pi * ((total - 1) / total - 0.2) / 0.8))
    assert record.lrs[-1] == pytest.approx(expected_last, rel=1e-6)
    assert record.lrs[-1] < 0.1 * base
