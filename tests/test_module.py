"""SkinFusionModule: steps on mixed batches, metric names, optimiser groups, freezing, faults, reload."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.errors import WeightsError
from skinfusion.training.losses import MultiTaskLoss
from skinfusion.training.module import NonFiniteLossError, SkinFusionModule

NUM_CLASSES = 3


def batch(n: int = 4, size: int = 64, has_mask=None, label=None) -> dict:
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(n, 1, size, size, generator=g) > 0.5).float()
    has_mask = torch.tensor(has_mask if has_mask is not None else [True] * n)
    mask[~has_mask] = 0
    return {
        "image": torch.rand(n, 3, size, size, generator=g),
        "mask": mask,
        "has_mask": has_mask,
        "label": torch.tensor(label if label is not None else [i % NUM_CLASSES for i in range(n)]),
        "id": [f"ISIC_{i:07d}" for i in range(n)],
    }


class ListData(pl.LightningDataModule):
    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    kwargs = {
        "accelerator": "cpu",
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
        **kwargs,
    }
    return pl.Trainer(**kwargs)


def test_mixed_batches_log_every_metric(tmp_path, tiny_net):
    """Mask-only, label-only and both in one batch, and batches with one kind entirely absent."""
    batches = [
        batch(has_mask=[True, False, True, False], label=[0, 1, -1, -1]),
        batch(has_mask=[False] * 4, label=[0, 1, 2, 0]),
        batch(has_mask=[True] * 4, label=[-1] * 4),
    ]
    module = SkinFusionModule(tiny_net(num_classes=NUM_CLASSES), class_names=["A", "B", "C"])
    t = trainer(tmp_path)
    t.fit(module, ListData(batches))
    metrics = t.callback_metrics
    for name in (
        "train/loss_epoch",
        "val/loss",
        "val/loss_seg",
        "val/loss_cls",
        "val/dice",
        "val/jaccard",
        "val/threshold_jaccard",
        "val/accuracy",
        "val/balanced_accuracy",
        "val/f1_macro",
        "val/auc",
        "val/f1/A",
        "val/precision/C",
        "val/recall/B",
    ):
        assert name in metrics, name
        assert math.isfinite(float(metrics[name])), name
    assert not {"val/recall_macro", "val/balanced_acc", "val/jaccard_thresholded"} & metrics.keys()  # one name each


def test_val_metrics_ignore_unlabelled_and_maskless(tmp_path):
    """A perfect mask on the annotated samples gives Dice 1 whatever the unannotated ones predict."""
    b = batch(has_mask=[True, True, False, False], label=[0, -1, 1, -1])

    class Oracle(torch.nn.Module):
        num_classes, has_decoder, has_classifier = NUM_CLASSES, True, True

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, image, meta=None):
            from skinfusion.nn.output import SkinFusionOutput

            mask_logits = (b["mask"] * 20 - 10) + self.p
            mask_logits[~b["has_mask"]] = 10.0  # wrong everywhere, but unannotated
            logits = torch.nn.functional.one_hot(b["label"].clamp_min(0), NUM_CLASSES).float() * 5 + self.p
            return SkinFusionOutput(mask_logits, logits, {})

    module = SkinFusionModule(Oracle(), class_names=["A", "B", "C"])
    t = trainer(tmp_path)
    t.validate(module, ListData([b]), verbose=False)
    assert float(t.callback_metrics["val/dice"]) == pytest.approx(1.0)
    assert float(t.callback_metrics["val/accuracy"]) == pytest.approx(1.0)


def test_encoder_lr_multiplier_and_param_groups(tiny_net):
    module = SkinFusionModule(
        tiny_net(num_classes=NUM_CLASSES),
        encoder_lr_mult=0.1,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
        class_names=["A", "B", "C"],
    )
    optimizer = module.configure_optimizers()
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == {"encoder": pytest.approx(0.05), "head": pytest.approx(0.5)}
    n_params = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert n_params == sum(p.numel() for p in module.parameters())


def test_freeze_encoder_for_first_epochs(tmp_path, tiny_net):
    net = tiny_net(num_classes=NUM_CLASSES)
    module = SkinFusionModule(net, freeze_encoder_epochs=1, class_names=["A", "B", "C"])
    before = {k: v.clone() for k, v in net.encoder.state_dict().items()}
    t = trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    t.fit(module, ListData([batch(), batch()]))
    after = net.encoder.state_dict()
    pretrained_keys = [k for k in before if "attn" not in k]
    assert pretrained_keys
    for k in pretrained_keys:
        assert torch.equal(before[k], after[k]), f"{k} changed while the encoder was frozen"
    head = dict(net.named_parameters())
    assert any(p.grad is not None for n, p in head.items() if n.startswith("classifier"))
    # Epoch 2: unfrozen, the encoder trains.
    t2 = trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    t2.fit(module, ListData([batch(), batch()]))
    assert any(not torch.equal(before[k], net.encoder.state_dict()[k]) for k in pretrained_keys)


def test_nonfinite_loss_raises_and_names_the_batch(tmp_path, tiny_net):
    bad = batch()
    bad["image"][0, 0, 0, 0] = float("nan")
    module = SkinFusionModule(tiny_net(num_classes=NUM_CLASSES), class_names=["A", "B", "C"])
    with pytest.raises(NonFiniteLossError, match="ISIC_0000000"):
        trainer(tmp_path, limit_val_batches=0).fit(module, ListData([bad]))


def test_nonfinite_loss_skip_leaves_weights_untouched(tmp_path, tiny_net):
    bad = batch()
    bad["image"][:] = float("nan")
    net = tiny_net(num_classes=NUM_CLASSES)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    module = SkinFusionModule(net, nonfinite_loss="skip", class_names=["A", "B", "C"])
    trainer(tmp_path, limit_val_batches=0).fit(module, ListData([bad]))
    for k, v in net.state_dict().items():
        if "running" in k or "num_batches" in k:
            continue  # BatchNorm statistics see the batch in the forward
        assert torch.equal(before[k], v), k


class CountedData(SkinFusionDataModule):
    """A SkinFusionDataModule whose training split has 6, 3 and 1 images of classes A, B, C."""

    def __init__(self, batches):
        super().__init__(class_names=["A", "B", "C"])
        self.batches = batches

    class_counts = [6, 3, 1]

    def prepare_data(self):
        pass

    def setup(self, stage=None):
        pass

    def train_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)

    def val_dataloader(self):
        return torch.utils.data.DataLoader(self.batches, batch_size=None)


def test_auto_class_weights_and_priors_from_datamodule(tmp_path, tiny_net):
    loss = MultiTaskLoss(class_weights="auto", logit_adjustment=1.0)
    module = SkinFusionModule(tiny_net(num_classes=NUM_CLASSES), loss=loss, class_names=["A", "B", "C"])
    trainer(tmp_path, limit_val_batches=0, max_steps=1).fit(module, CountedData([batch()]))
    # Inverse frequency 1/6, 1/3, 1 scaled to mean 1: times 3 / (1/6 + 1/3 + 1) = 2.
    assert module.loss.cls_loss.class_weights.tolist() == pytest.approx([1 / 3, 2 / 3, 2.0])
    assert module.hparams["loss_config"]["class_weights"] == pytest.approx([1 / 3, 2 / 3, 2.0])
    assert module.loss.cls_loss.log_priors.tolist() == pytest.approx(np.log([0.6, 0.3, 0.1]).tolist(), abs=1e-6)
    assert module.hparams["loss_config"]["class_priors"] == pytest.approx([0.6, 0.3, 0.1])


def test_auto_weights_and_priors_follow_balanced_sampling(tmp_path, tiny_net):
    """Sampling that balances the classes already leaves nothing for the weights or priors to correct."""
    data = CountedData([batch()])
    data.balanced_sampling = 1.0
    loss = MultiTaskLoss(class_weights="auto", logit_adjustment=1.0)
    module = SkinFusionModule(tiny_net(num_classes=NUM_CLASSES), loss=loss, class_names=["A", "B", "C"])
    trainer(tmp_path, limit_val_batches=0, max_steps=1).fit(module, data)
    assert module.loss.cls_loss.class_weights.tolist() == pytest.approx([1.0, 1.0, 1.0])
    assert module.loss.cls_loss.log_priors.tolist() == pytest.approx([np.log(1 / 3)] * 3, abs=1e-6)


def test_auto_class_weights_need_a_skinfusion_datamodule(tmp_path, tiny_net):
    module = SkinFusionModule(
        tiny_net(num_classes=NUM_CLASSES), loss=MultiTaskLoss(class_weights="auto"), class_names=["A", "B", "C"]
    )
    with pytest.raises(ValueError, match="SkinFusionDataModule"):
        trainer(tmp_path, limit_val_batches=0, max_steps=1).fit(module, ListData([batch()]))


def test_from_checkpoint_rebuilds_the_same_model(tmp_path, tiny_net):
    module = SkinFusionModule(
        tiny_net(num_classes=NUM_CLASSES, attention_placement=["skip", "classifier"]), class_names=["A", "B", "C"]
    )
    t = trainer(tmp_path, limit_val_batches=0, max_steps=2)
    t.fit(module, ListData([batch(), batch()]))
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    loaded = SkinFusionModule.from_checkpoint(path).eval()
    module.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        a, b = module(x), loaded(x)
    assert loaded.class_names == ["A", "B", "C"]
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    torch.testing.assert_close(a.class_logits, b.class_logits)
    assert a.attention.keys() == b.attention.keys()


def test_from_checkpoint_refuses_a_code_running_pickle(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": {}, "hyper_parameters": Evil()}, f)
    with pytest.raises(WeightsError, match="refused"):
        SkinFusionModule.from_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_class_names_must_match_network(tiny_net):
    with pytest.raises(ValueError, match="class names"):
        SkinFusionModule(tiny_net(num_classes=NUM_CLASSES), class_names=["A", "B"])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"encoder_lr_mult": -1}, "encoder_lr_mult"),
        ({"freeze_encoder_epochs": -1}, "freeze_encoder_epochs"),
        ({"nonfinite_loss": "ignore"}, "nonfinite_loss"),
    ],
)
def test_argument_errors(kwargs, match, tiny_net):
    with pytest.raises(ValueError, match=match):
        SkinFusionModule(tiny_net(num_classes=NUM_CLASSES), class_names=["A", "B", "C"], **kwargs)


def _accumulated(tiny_net) -> SkinFusionModule:
    """A module of one process half-way through its second training epoch: loss sums and metric states."""
    module = SkinFusionModule(tiny_net(seed=0, num_classes=NUM_CLASSES), class_names=["A", "B", "C"])
    module._trainer = SimpleNamespace(world_size=1, current_epoch=1)
    for i in range(2):
        b = batch(n=4, label=[i, 1, 2, -1])
        with torch.no_grad():
            module._update_metrics(module(b["image"]), b, "train")
    module._train_sums, module._train_weight = {"loss": torch.tensor(3.5, dtype=torch.float64)}, 8.0
    return module


@pytest.mark.parametrize(
    ("world_size", "epoch", "restored"),
    [(1, 1, True), (1, 2, False), (2, 1, False)],
    ids=["same-epoch", "later-epoch", "multi-process"],
)
def test_training_epoch_state_travels_in_checkpoints(tiny_net, world_size, epoch, restored):
    """A mid-epoch checkpoint restores the epoch's loss sums and metric states, in the same epoch of one process."""
    saved = _accumulated(tiny_net)
    checkpoint: dict = {}
    saved.on_save_checkpoint(checkpoint)
    assert "train_epoch_state" in checkpoint

    module = SkinFusionModule(tiny_net(seed=0, num_classes=NUM_CLASSES), class_names=["A", "B", "C"])
    module._trainer = SimpleNamespace(world_size=world_size, current_epoch=epoch)
    module.on_load_checkpoint(checkpoint)
    module.on_train_batch_start(batch(), 0)
    if restored:
        want = {**saved.cls_metrics["train_"].compute(), **saved.seg_metrics["train_"].compute()}
        assert module._seen["train"] == saved._seen["train"] == (8, 6)
        assert module._train_weight == 8
        assert module._train_sums["loss"].item() == 3.5
        got = {**module.cls_metrics["train_"].compute(), **module.seg_metrics["train_"].compute()}
        assert got.keys() == want.keys()
        for name in want:
            torch.testing.assert_close(got[name], want[name], msg=name)
    else:
        assert module._seen["train"] == (0, 0)
        assert module._train_weight == 0
        assert module._train_sums == {}
        assert module.cls_metrics["train_"]["confmat"].confmat.sum() == 0
    assert module._pending_epoch_state is None  # applied (or dropped) once


def test_multi_process_checkpoints_carry_no_training_epoch_state(tiny_net):
    module = _accumulated(tiny_net)
    module._trainer.world_size = 2
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    assert "train_epoch_state" not in checkpoint
