"""Losses against hand-computed values, and their behaviour on batches without masks or labels."""

from __future__ import annotations

import math

import pytest
import torch

from skinfusion.nn.output import SkinFusionOutput
from skinfusion.training.losses import ClassificationLoss, DiceBCELoss, MultiTaskLoss


def sig(v: float) -> float:
    return 1 / (1 + math.exp(-v))


def bce(logit: float, target: float) -> float:
    p = sig(logit)
    return -(target * math.log(p) + (1 - target) * math.log(1 - p))


# ---------------------------------------------------------------- Dice + BCE

# 1x1x1x2 masks: logits (0, ln 3) -> p = (0.5, 0.75); target (1, 0)
LOGITS = [0.0, math.log(3.0)]
TARGET = [1.0, 0.0]


def _tiny(logits=LOGITS, target=TARGET):
    return torch.tensor(logits).view(1, 1, 1, 2), torch.tensor(target).view(1, 1, 1, 2)


@pytest.mark.parametrize(
    ("dice_weight", "bce_weight", "smooth", "expected"),
    [
        # dice = (2 * 0.5 + s) / (1.25 + 1 + s)
        (1.0, 0.0, 0.0, 1 - 1.0 / 2.25),
        (1.0, 0.0, 1.0, 1 - 2.0 / 3.25),
        (0.0, 1.0, 1.0, (bce(0.0, 1.0) + bce(math.log(3.0), 0.0)) / 2),  # (ln 2 + ln 4) / 2
        (0.5, 2.0, 1.0, 0.5 * (1 - 2.0 / 3.25) + 2.0 * (math.log(2) + math.log(4)) / 2),
    ],
)
def test_dice_bce_table(dice_weight, bce_weight, smooth, expected):
    loss = DiceBCELoss(dice_weight=dice_weight, bce_weight=bce_weight, smooth=smooth)
    logits, target = _tiny()
    assert loss(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_dice_is_per_image_mean_and_excludes_samples_without_mask():
    loss = DiceBCELoss(dice_weight=1.0, bce_weight=0.0, smooth=0.0)
    logits = torch.tensor([LOGITS, [10.0, 10.0], [-3.0, 5.0]]).view(3, 1, 1, 2)
    target = torch.tensor([TARGET, [1.0, 1.0], [0.0, 0.0]]).view(3, 1, 1, 2)
    has_mask = torch.tensor([True, True, False])
    p = sig(10.0)
    dice_second = 4 * p / (2 * p + 2)
    expected = ((1 - 1.0 / 2.25) + (1 - dice_second)) / 2
    assert loss(logits, target, has_mask).item() == pytest.approx(expected, rel=1e-6)


def test_no_mask_batch_is_zero_with_zero_gradient():
    logits = torch.randn(2, 1, 4, 4, requires_grad=True)
    value = DiceBCELoss()(logits, torch.zeros(2, 1, 4, 4), torch.tensor([False, False]))
    assert value.item() == 0.0
    value.backward()
    assert logits.grad is not None
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_dice_bce_shape_mismatch():
    with pytest.raises(ValueError, match="differ in shape"):
        DiceBCELoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dice_weight": -1.0}, "must be >= 0"),
        ({"dice_weight": 0.0, "bce_weight": 0.0}, "both 0"),
        ({"smooth": -1.0}, "smooth"),
    ],
)
def test_dice_bce_invalid_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiceBCELoss(**kwargs)


# ---------------------------------------------------------------- classification

# two samples, three classes; logits chosen so that the softmax is easy to write down
CLS_LOGITS = torch.tensor([[math.log(2.0), 0.0, 0.0], [0.0, math.log(3.0), 0.0]])
# sample 0: p = (1/2, 1/4, 1/4); sample 1: p = (1/5, 3/5, 1/5)
CLS_LABEL = torch.tensor([0, 2])


def test_ce_plain():
    expected = (-math.log(1 / 2) - math.log(1 / 5)) / 2
    assert ClassificationLoss("ce")(CLS_LOGITS, CLS_LABEL).item() == pytest.approx(expected, rel=1e-6)


def test_ce_class_weights():
    weights = [2.0, 1.0, 0.5]
    expected = (2.0 * -math.log(1 / 2) + 0.5 * -math.log(1 / 5)) / (2.0 + 0.5)
    loss = ClassificationLoss("ce", class_weights=weights)
    assert loss(CLS_LOGITS, CLS_LABEL).item() == pytest.approx(expected, rel=1e-6)


def test_ce_label_smoothing():
    e = 0.3
    # loss_i = (1-e) * nll_i + e/K * sum_k -log p_ik
    s0 = -(math.log(1 / 2) + 2 * math.log(1 / 4)) / 3
    s1 = -(2 * math.log(1 / 5) + math.log(3 / 5)) / 3
    expected = ((1 - e) * -math.log(1 / 2) + e * s0 + (1 - e) * -math.log(1 / 5) + e * s1) / 2
    loss = ClassificationLoss("ce", label_smoothing=e)
    assert loss(CLS_LOGITS, CLS_LABEL).item() == pytest.approx(expected, rel=1e-6)


def test_ce_weights_and_smoothing_match_pytorch():
    torch.manual_seed(0)
    logits, label = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 1, 2])
    weights = torch.tensor([1.0, 2.0, 0.5, 3.0])
    ours = ClassificationLoss("ce", class_weights=weights, label_smoothing=0.1)(logits, label)
    torch.testing.assert_close(
        ours, torch.nn.functional.cross_entropy(logits, label, weight=weights, label_smoothing=0.1)
    )


def test_focal_two_samples():
    gamma = 2.0
    # sample 0: p_t = 1/2 -> (1/2)^2 * ln 2; sample 1: p_t = 1/5 -> (4/5)^2 * ln 5
    expected = (0.25 * math.log(2) + 0.64 * math.log(5)) / 2
    assert ClassificationLoss("focal", focal_gamma=gamma)(CLS_LOGITS, CLS_LABEL).item() == pytest.approx(expected)
    alpha = [0.25, 1.0, 0.75]
    expected_alpha = (0.25 * 0.25 * math.log(2) + 0.75 * 0.64 * math.log(5)) / 2
    loss = ClassificationLoss("focal", class_weights=alpha, focal_gamma=gamma)
    assert loss(CLS_LOGITS, CLS_LABEL).item() == pytest.approx(expected_alpha)


def test_focal_gamma_zero_is_mean_nll():
    expected = (math.log(2) + math.log(5)) / 2
    assert ClassificationLoss("focal", focal_gamma=0.0)(CLS_LOGITS, CLS_LABEL).item() == pytest.approx(expected)


@pytest.mark.parametrize("kind", ["ce", "focal"])
def test_label_minus_one_is_ignored(kind):
    logits = torch.cat([CLS_LOGITS, torch.tensor([[9.0, -9.0, 3.0]])])
    label = torch.tensor([0, 2, -1])
    loss = ClassificationLoss(kind)
    torch.testing.assert_close(loss(logits, label), loss(CLS_LOGITS, CLS_LABEL))


@pytest.mark.parametrize("kind", ["ce", "focal"])
def test_no_label_batch_is_zero_with_zero_gradient(kind):
    logits = torch.randn(3, 4, requires_grad=True)
    value = ClassificationLoss(kind, class_weights=[1.0, 2.0, 3.0, 4.0])(logits, torch.full((3,), -1))
    assert value.item() == 0.0
    value.backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"loss": "hinge"}, "unknown classification loss"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"loss": "focal", "label_smoothing": 0.1}, "only supported"),
        ({"focal_gamma": -1.0}, "focal_gamma"),
        ({"class_weights": [1.0, -1.0]}, "non-negative"),
    ],
)
def test_classification_invalid_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ClassificationLoss(**kwargs)


def test_class_weights_count_must_match():
    with pytest.raises(ValueError, match="2 class_weights for 3 classes"):
        ClassificationLoss(class_weights=[1.0, 2.0])(CLS_LOGITS, CLS_LABEL)


def test_class_weights_are_a_buffer():
    loss = ClassificationLoss(class_weights=[1.0, 2.0, 3.0])
    assert "class_weights" in dict(loss.named_buffers())


# ---------------------------------------------------------------- multi-task


def _batch(has_mask, label):
    mask_logits, mask = _tiny()
    n = len(label)
    return (
        SkinFusionOutput(mask_logits.repeat(n, 1, 1, 1).requires_grad_(), CLS_LOGITS[:n].clone().requires_grad_(), {}),
        {"mask": mask.repeat(n, 1, 1, 1), "has_mask": torch.tensor(has_mask), "label": torch.tensor(label)},
    )


SEG = (1 - 2.0 / 3.25) + (math.log(2) + math.log(4)) / 2  # dice (smooth 1) + bce of the tiny mask
CLS = (-math.log(1 / 2) - math.log(1 / 5)) / 2


def test_multitask_fixed_weights():
    output, batch = _batch([True, True], [0, 2])
    result = MultiTaskLoss(seg_weight=2.0, cls_weight=0.5)(output, batch)
    assert result["loss_seg"].item() == pytest.approx(SEG, rel=1e-6)
    assert result["loss_cls"].item() == pytest.approx(CLS, rel=1e-6)
    assert result["loss"].item() == pytest.approx(2.0 * SEG + 0.5 * CLS, rel=1e-6)


def test_multitask_uncertainty_formula():
    output, batch = _batch([True, True], [0, 2])
    loss = MultiTaskLoss(uncertainty=True)
    with torch.no_grad():
        loss.log_vars["seg"].fill_(0.5)
        loss.log_vars["cls"].fill_(-1.0)
    result = loss(output, batch)
    expected = math.exp(-0.5) * SEG + 0.5 + math.exp(1.0) * CLS - 1.0
    assert result["loss"].item() == pytest.approx(expected, rel=1e-6)
    assert result["weight_seg"].item() == pytest.approx(math.exp(-0.5))
    assert result["weight_cls"].item() == pytest.approx(math.exp(1.0))
    result["loss"].backward()
    # d/ds [exp(-s) L + s] = 1 - exp(-s) L
    assert loss.log_vars["seg"].grad.item() == pytest.approx(1 - math.exp(-0.5) * SEG, rel=1e-5)
    assert loss.log_vars["cls"].grad.item() == pytest.approx(1 - math.exp(1.0) * CLS, rel=1e-5)


@pytest.mark.parametrize("uncertainty", [False, True])
@pytest.mark.parametrize("missing", ["seg", "cls"])
def test_multitask_batch_without_masks_or_labels(missing, uncertainty):
    """A batch with no masks (or no labels) gives that task a zero loss and zero gradients; the other task trains."""
    output, batch = _batch([False, False], [0, 2]) if missing == "seg" else _batch([True, True], [-1, -1])
    loss = MultiTaskLoss(uncertainty=uncertainty)
    result = loss(output, batch)
    assert result[f"loss_{missing}"].item() == 0.0
    assert result["loss"].item() == pytest.approx(CLS if missing == "seg" else SEG, rel=1e-6)
    result["loss"].backward()
    idle, trained = (
        (output.mask_logits, output.class_logits) if missing == "seg" else (output.class_logits, output.mask_logits)
    )
    assert torch.equal(idle.grad, torch.zeros_like(idle))
    assert trained.grad.abs().sum() > 0
    if uncertainty:
        assert loss.log_vars[missing].grad.item() == 0.0


def test_multitask_skips_heads_the_network_does_not_have():
    output, batch = _batch([True, True], [0, 2])
    result = MultiTaskLoss()(output._replace(mask_logits=None), batch)
    assert set(result) == {"loss", "loss_cls"}
    with pytest.raises(ValueError, match="neither"):
        MultiTaskLoss()(output._replace(mask_logits=None, class_logits=None), batch)


def test_multitask_invalid_args():
    with pytest.raises(ValueError, match="seg_weight"):
        MultiTaskLoss(seg_weight=-1.0)
    with pytest.raises(ValueError, match="unknown classification loss"):
        MultiTaskLoss(cls_loss="hinge")
