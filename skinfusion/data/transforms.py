"""Albumentations pipelines that move an image and its lesion mask together.

Training follows the paper's augmentation (flips, rotation, zoom and crop) with an optional
colour jitter; evaluation only resizes. Every geometric step warps the mask with nearest
neighbour interpolation, so the mask stays exactly binary, and the pipeline ends in tensors:
image float32 (3,H,W) normalised, mask float32 (1,H,W) in {0,1}.
"""

from __future__ import annotations

from typing import Any, Literal

import albumentations as A
import cv2
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NORMALIZATIONS",
    "STAGES",
    "MaskAddChannel",
    "MaskToFloat",
    "build_transforms",
    "normalize_tensor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
#: ``unit`` scales to [0, 1] (the paper); ``imagenet`` also standardises with the ImageNet mean/std.
NORMALIZATIONS: tuple[str, ...] = ("unit", "imagenet")
STAGES: tuple[str, ...] = ("train", "val", "test", "predict")


class _MaskOnly(A.DualTransform):
    """A step that changes the mask only; the image passes unchanged."""

    def __init__(self, p: float = 1.0) -> None:
        super().__init__(p=p)

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ()


class MaskToFloat(_MaskOnly):
    """Turn an (H,W) {0,1} uint8 mask into float32 (1,H,W), before ``ToTensorV2`` (which keeps the channel axis)."""

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        if mask.ndim == 3:  # (H,W,1)
            mask = mask[..., 0]
        return mask.astype(np.float32)[None]


class MaskAddChannel(_MaskOnly):
    """Turn an (H,W) mask into (1,H,W) keeping its dtype (uint8 stays uint8)."""

    def apply_to_mask(self, mask: np.ndarray, **params: Any) -> np.ndarray:
        return mask[None] if mask.ndim == 2 else np.moveaxis(mask, -1, 0)


def _mean_std(normalization: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    return (IMAGENET_MEAN, IMAGENET_STD) if normalization == "imagenet" else ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def normalize_tensor(image: torch.Tensor, normalization: str = "imagenet") -> torch.Tensor:
    """Normalise uint8 images on whatever device they are, as the pipeline's ``A.Normalize`` would on the CPU.

    Args:
        image: uint8 (B,3,H,W) or (3,H,W) RGB (any dtype with values in [0, 255] works).
        normalization: ``unit`` or ``imagenet``.

    Returns:
        float32 tensor of the same shape and memory format: ``(image / 255 - mean) / std``.

    Raises:
        ValueError: unknown normalization or not 3 channels.
    """
    mean, std = _mean_std(normalization)
    channel_axis = image.ndim - 3
    if image.ndim < 3 or image.shape[channel_axis] != 3:
        raise ValueError(f"expected (B,3,H,W) or (3,H,W) images, got {tuple(image.shape)}")
    shape = (3, 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], device=image.device).view(shape)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], device=image.device).view(shape)
    return torch.addcmul(shift, image.float(), scale)


def build_transforms(
    stage: Literal["train", "val", "test", "predict"],
    image_size: int = 224,
    normalization: Literal["unit", "imagenet"] = "imagenet",
    augment: bool = True,
    color_jitter: float = 0.0,
    seed: int | None = None,
    normalize: bool = True,
) -> A.Compose:
    """Build the image+mask pipeline of one stage.

    ``train`` with ``augment``: RandomResizedCrop to ``image_size`` (zoom in and crop, scale 0.5–1
    of the area, aspect 3/4–4/3), horizontal and vertical flips, an affine warp with any rotation
    angle and a zoom of 0.9–1.1 (borders reflected, which suits skin), then a colour jitter when
    ``color_jitter > 0``. Every other case: resize to ``image_size`` x ``image_size``.

    Call it as ``out = transform(image=image, mask=mask)`` with image uint8 (H,W,3) RGB and mask
    uint8 (H,W) in {0,1}; ``out["image"]`` is float32 (3,S,S), ``out["mask"]`` float32 (1,S,S).

    Args:
        stage: ``train``, ``val``, ``test`` or ``predict``.
        normalization: ``unit`` ([0,1], as the paper) or ``imagenet`` (mean/std of ImageNet).
        augment: apply the training augmentation (only used when ``stage == "train"``).
        color_jitter: strength of brightness/contrast/saturation jitter (hue gets a quarter of
            it); 0 disables it. Must be in [0, 1).
        seed: seed of the pipeline's own random state (albumentations ignores global seeds); the
            DataModule reseeds it in every worker.
        normalize: ``False`` leaves the image uint8 (3,S,S) and the mask uint8 (1,S,S) in {0,1}, to be
            normalised later with :func:`normalize_tensor`, e.g. on the GPU.

    Raises:
        ValueError: unknown stage or normalization, a non-positive size, or a jitter outside [0, 1).
    """
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    if image_size < 1:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0.0 <= color_jitter < 1.0:
        raise ValueError(f"color_jitter must be in [0, 1), got {color_jitter}")
    mean, std = _mean_std(normalization)  # checks the name even when normalising later
    tail = [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), MaskToFloat()] if normalize else [MaskAddChannel()]
    if stage == "train" and augment:
        steps: list[A.BasicTransform] = [
            A.RandomResizedCrop(size=(image_size, image_size), scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)),
            A.HorizontalFlip(p=0.5),
            A.VerticalFlip(p=0.5),
            A.Affine(scale=(0.9, 1.1), rotate=(-180, 180), border_mode=cv2.BORDER_REFLECT_101, p=0.75),
        ]
        if color_jitter > 0:
            steps.append(
                A.ColorJitter(
                    brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=color_jitter / 4, p=0.8
                )
            )
    else:
        steps = [A.Resize(image_size, image_size)]
    return A.Compose([*steps, *tail, ToTensorV2()], mask_interpolation=cv2.INTER_NEAREST, seed=seed)
