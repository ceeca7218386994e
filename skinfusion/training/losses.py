"""Losses: Dice + BCE on the masks that exist, CE or focal loss on the labels that exist, and their sum.

Batches mix images with a mask and no diagnosis (ISIC Task 1) and images with a diagnosis and no mask
(Task 3). Each loss averages over the samples that have a target, and a batch without any gives an exact
zero still connected to the graph, so that every parameter gets a (zero) gradient and DDP does not hang.

References: focal loss, Lin et al., ICCV 2017; uncertainty weighting, Kendall et al., CVPR 2018
(https://arxiv.org/abs/1705.07115), as ``sum_i exp(-s_i) L_i + s_i`` with learnable ``s_i = log sigma_i^2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skinfusion.nn.net import plain_config

__all__ = ["CLS_LOSSES", "ClassificationLoss", "DiceBCELoss", "MultiTaskLoss", "inverse_frequency", "log_priors"]

CLS_LOSSES = ("ce", "focal")


def _masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * v) / sum(w)``, and an exact, graph-connected 0 when ``sum(w) == 0``."""
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


def _class_weights(class_weights: Sequence[float] | Tensor) -> Tensor:
    weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
    if weights.numel() == 0 or bool((weights < 0).any()) or not bool(torch.isfinite(weights).all()):
        raise ValueError(f"class_weights must be finite, non-negative and non-empty, got {class_weights}")
    return weights


class DiceBCELoss(nn.Module):
    """Soft Dice loss plus binary cross-entropy, over the samples that have a mask.

    ``dice_i = (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)`` per image with ``p = sigmoid(logits)``;
    the loss is ``dice_weight * mean_i(1 - dice_i) + bce_weight * mean_i(BCE_i)`` where ``BCE_i`` is the mean
    pixel BCE of image ``i`` and ``i`` runs over the images with ``has_mask``.

    ``smooth`` is added to the Dice's numerator and denominator (> 0 keeps an empty mask finite).

    Shape:
        mask_logits (B,1,H,W), mask (B,1,H,W) in {0,1}, has_mask (B,) bool (``None``: all) -> scalar.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, smooth: float = 1.0) -> None:
        super().__init__()
        if dice_weight < 0 or bce_weight < 0:
            raise ValueError(f"dice_weight and bce_weight must be >= 0, got {dice_weight}, {bce_weight}")
        if dice_weight == 0 and bce_weight == 0:
            raise ValueError("dice_weight and bce_weight are both 0")
        if smooth < 0:
            raise ValueError(f"smooth must be >= 0, got {smooth}")
        self.dice_weight = dice_weight
        self.bce_weight = bce_weight
        self.smooth = smooth

    def forward(self, mask_logits: Tensor, mask: Tensor, has_mask: Tensor | None = None) -> Tensor:
        if mask_logits.shape != mask.shape:
            raise ValueError(f"mask_logits {tuple(mask_logits.shape)} and mask {tuple(mask.shape)} differ in shape")
        if has_mask is None:
            has_mask = torch.ones(mask.shape[0], dtype=torch.bool, device=mask_logits.device)
        if has_mask.shape != mask.shape[:1]:
            raise ValueError(f"has_mask {tuple(has_mask.shape)} does not match batch size {mask.shape[0]}")
        weights = has_mask.to(device=mask_logits.device, dtype=torch.float32)
        logits = mask_logits.float().flatten(1)
        target = mask.float().flatten(1)
        loss = logits.sum() * 0.0
        if self.dice_weight:
            probs = torch.sigmoid(logits)
            dice = (2 * (probs * target).sum(1) + self.smooth) / (probs.sum(1) + target.sum(1) + self.smooth)
            loss = loss + self.dice_weight * _masked_mean(1 - dice, weights)
        if self.bce_weight:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
            loss = loss + self.bce_weight * _masked_mean(bce, weights)
        return loss


class ClassificationLoss(nn.Module):
    """Cross-entropy (optional class weights and label smoothing) or focal loss; label ``-1`` is ignored.

    * ``"ce"``: ``loss_i = (1-e) w[y_i] (-log p_{i,y_i}) + e/K sum_k w[k] (-log p_{i,k})``, reduced as
      ``sum_i loss_i / sum_i w[y_i]`` over labelled samples (PyTorch's weighted mean; ``w = 1`` without weights).
    * ``"focal"``: ``loss_i = -a[y_i] (1 - p_{i,y_i})^gamma log p_{i,y_i}`` (Lin et al., 2017) with ``a`` the class
      weights (1 without), averaged over labelled samples.
    * ``logit_adjustment`` ``tau > 0``: the loss sees ``logits + tau * log(prior)`` (Menon et al., 2021), so that
      the network's own logits, at inference, estimate the class-balanced posterior: the argmax then maximises
      balanced accuracy instead of accuracy, without resampling or reweighting the data.

    Args:
        loss: ``"ce"`` or ``"focal"``.
        class_weights: (K,) non-negative weights (CE) or alphas (focal); kept as a buffer.
        label_smoothing: CE label smoothing ``e`` in [0, 1).
        focal_gamma: focusing parameter (>= 0; 0 gives a weighted CE averaged per sample).
        ignore_index: label value of unlabelled samples.
        logit_adjustment: ``tau`` (>= 0; 1 is the Bayes-optimal value for balanced error).
        class_priors: (K,) training class frequencies (any positive scale) for ``logit_adjustment``; kept as a
            buffer of their logarithms. Classes with no training sample get half the smallest observed count.

    Shape:
        class_logits (B,K), label (B,) int64 -> scalar.
    """

    def __init__(
        self,
        loss: str = "ce",
        class_weights: Sequence[float] | Tensor | None = None,
        label_smoothing: float = 0.0,
        focal_gamma: float = 2.0,
        ignore_index: int = -1,
        logit_adjustment: float = 0.0,
        class_priors: Sequence[float] | Tensor | None = None,
    ) -> None:
        super().__init__()
        if loss not in CLS_LOSSES:
            raise ValueError(f"unknown classification loss {loss!r}; choose one of {list(CLS_LOSSES)}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        if label_smoothing and loss == "focal":
            raise ValueError("label_smoothing is only supported with loss='ce'")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        if logit_adjustment < 0:
            raise ValueError(f"logit_adjustment must be >= 0, got {logit_adjustment}")
        self.loss = loss
        self.label_smoothing = label_smoothing
        self.focal_gamma = focal_gamma
        self.ignore_index = ignore_index
        self.logit_adjustment = logit_adjustment
        self.register_buffer("class_weights", None if class_weights is None else _class_weights(class_weights))
        self.register_buffer("log_priors", None if class_priors is None else log_priors(class_priors))

    def forward(self, class_logits: Tensor, label: Tensor) -> Tensor:
        if class_logits.ndim != 2 or label.shape != class_logits.shape[:1]:
            raise ValueError(
                f"expected class_logits (B,K) and label (B,), got {tuple(class_logits.shape)}, {tuple(label.shape)}"
            )
        num_classes = class_logits.shape[1]
        if self.class_weights is not None and self.class_weights.numel() != num_classes:
            raise ValueError(f"{self.class_weights.numel()} class_weights for {num_classes} classes")
        logits = class_logits.float()
        if self.logit_adjustment:
            if self.log_priors is None or self.log_priors.numel() != num_classes:
                raise ValueError(f"logit_adjustment needs class_priors for {num_classes} classes")
            logits = logits + self.logit_adjustment * self.log_priors
        valid = label != self.ignore_index
        target = torch.where(valid, label, torch.zeros_like(label))
        weight = self.class_weights
        sample_weight = weight[target] if weight is not None else torch.ones_like(logits[:, 0])
        sample_weight = sample_weight * valid.to(logits.dtype)
        log_probs = F.log_softmax(logits, dim=1)
        nll = -log_probs.gather(1, target[:, None])[:, 0]
        if self.loss == "ce":
            per_sample = (1 - self.label_smoothing) * sample_weight * nll
            if self.label_smoothing:
                smooth = -(log_probs * (weight if weight is not None else 1.0)).sum(1) / num_classes
                per_sample = per_sample + self.label_smoothing * smooth * valid.to(logits.dtype)
            # No labelled sample: 0 / eps = 0, still connected to the logits through the zero weights.
            return per_sample.sum() / sample_weight.sum().clamp_min(1e-12)
        p_true = nll.neg().exp()
        per_sample = sample_weight * (1 - p_true).pow(self.focal_gamma) * nll
        return per_sample.sum() / valid.sum().clamp_min(1)


def inverse_frequency(counts: Sequence[float]) -> list[float]:
    """Inverse class frequency (of counts or frequencies), scaled to mean 1 over the present classes; 0 if absent."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.sum() == 0:
        return [1.0] * len(counts)
    inverse = torch.where(counts > 0, 1.0 / torch.where(counts > 0, counts, 1.0), 0.0)
    inverse *= (counts > 0).sum() / inverse.sum()
    return inverse.tolist()


def log_priors(class_priors: Sequence[float] | Tensor) -> Tensor:
    """Log class frequencies (normalised); a class with no sample counts as half the smallest observed one."""
    priors = torch.as_tensor(class_priors, dtype=torch.float64).flatten()
    if priors.numel() == 0 or bool((priors < 0).any()) or not bool(torch.isfinite(priors).all()) or priors.sum() <= 0:
        raise ValueError(f"class_priors must be finite, non-negative, not all zero, got {class_priors}")
    priors = torch.where(priors > 0, priors, priors[priors > 0].min() / 2)
    return (priors / priors.sum()).log().float()


class MultiTaskLoss(nn.Module):
    """Segmentation + classification loss of a :class:`~skinfusion.nn.SkinFusionOutput` on a batch.

    ``loss = seg_weight * L_seg + cls_weight * L_cls`` with fixed weights, or with ``uncertainty=True``
    ``loss = sum_i [exp(-s_i) * w_i * L_i + s_i]`` over the tasks present in the batch, ``s_i`` learnable
    (initialised at 0) as in Kendall et al. (2018). A task absent from the batch (no ``has_mask``, or every
    label -1) contributes an exact zero and no gradient to its ``s_i``. A head the network does not have
    (``None`` in the output) is skipped, and its key is absent from the result.

    Args:
        seg_weight, cls_weight: fixed task weights (>= 0).
        uncertainty: learn the task weighting.
        class_weights: as in :class:`ClassificationLoss`, or ``"auto"``: inverse class frequency of the
            training split, filled in by :class:`~skinfusion.SkinFusionModule` from the DataModule at setup.
        class_priors: as in :class:`ClassificationLoss`, or ``"auto"`` (the default): the training split's
            class counts, filled in at setup like ``class_weights="auto"``.
        cls_loss, label_smoothing, focal_gamma, logit_adjustment: see :class:`ClassificationLoss`.
        dice_weight, bce_weight, smooth: see :class:`DiceBCELoss`.

    Returns (forward):
        dict with ``loss`` and, for each head present, ``loss_seg``/``loss_cls``; with ``uncertainty`` also
        ``weight_seg``/``weight_cls`` = ``exp(-s_i)`` (detached).
    """

    def __init__(
        self,
        seg_weight: float = 1.0,
        cls_weight: float = 1.0,
        uncertainty: bool = False,
        cls_loss: str = "ce",
        class_weights: Sequence[float] | Tensor | Literal["auto"] | None = None,
        label_smoothing: float = 0.0,
        focal_gamma: float = 2.0,
        logit_adjustment: float = 0.0,
        class_priors: Sequence[float] | Literal["auto"] = "auto",
        dice_weight: float = 1.0,
        bce_weight: float = 1.0,
        smooth: float = 1.0,
    ) -> None:
        super().__init__()
        #: The constructor arguments as plain values (checkpoints store it to rebuild the loss).
        self.config: dict[str, Any] = plain_config(locals())
        self.auto_class_weights = isinstance(class_weights, str)
        if self.auto_class_weights:
            if class_weights != "auto":
                raise ValueError(f"class_weights must be a list of floats, 'auto' or None, got {class_weights!r}")
            class_weights = None
        if isinstance(class_priors, str) and class_priors != "auto":
            raise ValueError(f"class_priors must be a list of floats or 'auto', got {class_priors!r}")
        #: Whether the module must fill in class priors from the training split (``set_class_counts``).
        self.auto_class_priors = bool(logit_adjustment) and isinstance(class_priors, str)
        if isinstance(class_priors, str):
            class_priors = None
        if seg_weight < 0 or cls_weight < 0:
            raise ValueError(f"seg_weight and cls_weight must be >= 0, got {seg_weight}, {cls_weight}")
        self.seg_weight = seg_weight
        self.cls_weight = cls_weight
        self.uncertainty = uncertainty
        self.seg_loss = DiceBCELoss(dice_weight=dice_weight, bce_weight=bce_weight, smooth=smooth)
        self.cls_loss = ClassificationLoss(
            cls_loss,
            class_weights=class_weights,
            label_smoothing=label_smoothing,
            focal_gamma=focal_gamma,
            logit_adjustment=logit_adjustment,
            class_priors=class_priors if logit_adjustment else None,
        )
        self.log_vars = nn.ParameterDict(
            {"seg": nn.Parameter(torch.zeros(())), "cls": nn.Parameter(torch.zeros(()))} if uncertainty else {}
        )

    def set_class_counts(self, counts: Sequence[float]) -> None:
        """Resolve ``class_weights="auto"`` and ``class_priors="auto"`` from the training labels' class counts."""
        if self.auto_class_weights:
            self.set_class_weights(inverse_frequency(counts))
        if self.auto_class_priors:
            device = next((b.device for b in self.buffers()), None)
            self.cls_loss.log_priors = log_priors(counts).to(device)
            self.config["class_priors"] = [float(c) for c in counts]
            self.auto_class_priors = False

    def set_class_weights(self, class_weights: Sequence[float] | Tensor) -> None:
        """Set the classification class weights (used to resolve ``class_weights="auto"``)."""
        weights = _class_weights(class_weights)
        device = next((b.device for b in self.buffers()), weights.device)
        self.cls_loss.class_weights = weights.to(device)
        self.config["class_weights"] = weights.tolist()
        self.auto_class_weights = False

    def forward(self, output: Any, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """The losses of a ``SkinFusionOutput`` (``batch`` needs ``mask``/``has_mask``, ``label`` for its heads)."""
        terms: dict[str, tuple[Tensor, Tensor, float]] = {}  # task -> (loss, present, fixed weight)
        if output.mask_logits is not None:
            has_mask = batch.get("has_mask")
            if has_mask is None:
                has_mask = torch.ones(batch["mask"].shape[0], dtype=torch.bool, device=batch["mask"].device)
            loss_seg = self.seg_loss(output.mask_logits, batch["mask"], has_mask)
            terms["seg"] = (loss_seg, has_mask.any(), self.seg_weight)
        if output.class_logits is not None:
            label = batch["label"]
            loss_cls = self.cls_loss(output.class_logits, label)
            terms["cls"] = (loss_cls, (label != self.cls_loss.ignore_index).any(), self.cls_weight)
        if not terms:
            raise ValueError("the output has neither mask_logits nor class_logits")

        result: dict[str, Tensor] = {}
        total = None
        for task, (value, present, weight) in terms.items():
            result[f"loss_{task}"] = value
            if self.uncertainty:
                s = self.log_vars[task]
                term = present.to(value.dtype) * (torch.exp(-s) * weight * value + s)
                result[f"weight_{task}"] = torch.exp(-s).detach()
            else:
                term = weight * value
            total = term if total is None else total + term
        result["loss"] = total
        return result
