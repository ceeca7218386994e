"""Flip/rotation test-time augmentation, as a pure function of a model function."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch

__all__ = ["tta_flips", "tta_transforms"]

ModelFn = Callable[[torch.Tensor], Sequence[torch.Tensor | None]]

# Each transform acts on the last two dims (H, W) and is paired with its inverse.
_Transform = Callable[[torch.Tensor], torch.Tensor]
_FLIPS: tuple[tuple[str, _Transform, _Transform], ...] = (
    ("identity", lambda x: x, lambda x: x),
    ("hflip", lambda x: x.flip(-1), lambda x: x.flip(-1)),
    ("vflip", lambda x: x.flip(-2), lambda x: x.flip(-2)),
    ("rot180", lambda x: x.flip(-2, -1), lambda x: x.flip(-2, -1)),
)
_ROTATIONS: tuple[tuple[str, _Transform, _Transform], ...] = (
    ("rot90", lambda x: x.rot90(1, (-2, -1)), lambda x: x.rot90(-1, (-2, -1))),
    ("rot270", lambda x: x.rot90(-1, (-2, -1)), lambda x: x.rot90(1, (-2, -1))),
    ("transpose", lambda x: x.transpose(-2, -1), lambda x: x.transpose(-2, -1)),
    ("antitranspose", lambda x: x.flip(-2, -1).transpose(-2, -1), lambda x: x.transpose(-2, -1).flip(-2, -1)),
)


def tta_transforms(rot90: bool = False) -> tuple[str, ...]:
    """Names of the views :func:`tta_flips` averages: 4 flips, or the 8 symmetries of the square."""
    return tuple(name for name, _, _ in (_FLIPS + _ROTATIONS if rot90 else _FLIPS))


def tta_flips(
    fn: ModelFn,
    image: torch.Tensor,
    rot90: bool = False,
    average: Literal["logits", "probs"] = "logits",
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Run ``fn`` on flipped (and optionally rotated) copies of ``image`` and average the outputs.

    Mask logits are mapped back to the original orientation before averaging; class logits are
    averaged as they are. Call it under ``torch.no_grad()`` / ``inference_mode()`` for inference.

    Args:
        fn: model function ``image -> (mask_logits | None, class_logits | None, ...)``; a
            :class:`~skinfusion.nn.output.SkinFusionOutput` qualifies (extra fields are ignored).
        image: (B,C,H,W) batch. With ``rot90`` and H != W, ``fn`` receives (B,C,W,H) views.
        rot90: also use 90/270-degree rotations and the two transposes (8 views instead of 4).
        average: ``"logits"`` averages logits; ``"probs"`` averages probabilities (sigmoid for
            masks, softmax for classes) and returns them as logits again (``logit`` of the mean
            for masks, ``log`` of the mean for classes), so the output type is the same.

    Returns:
        ``(mask_logits (B,1,H,W) | None, class_logits (B,K) | None)``.

    Raises:
        ValueError: if ``image`` is not 4-D or ``average`` is unknown.
    """
    if image.ndim != 4:
        raise ValueError(f"image must be (B,C,H,W), got shape {tuple(image.shape)}")
    if average not in ("logits", "probs"):
        raise ValueError(f"average must be 'logits' or 'probs', got {average!r}")
    views = _FLIPS + _ROTATIONS if rot90 else _FLIPS
    mask_sum: torch.Tensor | None = None
    class_sum: torch.Tensor | None = None
    for _, forward, inverse in views:
        output = fn(forward(image))
        mask_logits, class_logits = output[0], output[1]
        if mask_logits is not None:
            mask = inverse(mask_logits)
            mask = mask.sigmoid() if average == "probs" else mask
            mask_sum = mask if mask_sum is None else mask_sum + mask
        if class_logits is not None:
            scores = class_logits.softmax(dim=-1) if average == "probs" else class_logits
            class_sum = scores if class_sum is None else class_sum + scores
    n = len(views)
    mask_out = None if mask_sum is None else mask_sum / n
    class_out = None if class_sum is None else class_sum / n
    if average == "probs":
        mask_out = None if mask_out is None else torch.logit(mask_out, eps=1e-7)
        class_out = None if class_out is None else class_out.clamp_min(1e-12).log()
    return mask_out, class_out
