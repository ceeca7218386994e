"""Mask post-processing: from a lesion probability map to a clean binary mask, in this order:

1. (optional) bilinear resize of the *probability* map to the original image size, so that the
   threshold is applied at full resolution rather than upsampling a blocky low-res mask;
2. threshold (``prob > threshold``);
3. morphological opening with a disk of ``opening_radius`` pixels (removes thin spurs, hair-like
   strands and specks narrower than the disk);
4. removal of 8-connected components smaller than ``min_size`` pixels, and/or keeping only the
   largest component (a dermoscopic image shows one lesion);
5. filling of holes (background regions not connected to the image border).

If nothing survives steps 2-4 the mask stays empty (the ISIC scorer rates an empty prediction 1.0 on an
empty truth), unless ``fallback`` asks for the region around the most probable pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage


def resize_probability(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an (H,W) probability map bilinearly to ``size`` = ``(width, height)``: float32, clipped to [0, 1].

    Raises:
        ValueError: if ``prob`` is not a non-empty 2-D array or ``size`` is not two positive ints.
    """
    prob = np.asarray(prob)
    if prob.ndim != 2 or prob.size == 0:
        raise ValueError(f"prob must be a non-empty 2-D (H,W) array, got shape {prob.shape}")
    width, height = (int(v) for v in size)
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be a positive (width, height), got {size}")
    prob = prob.astype(np.float32, copy=False)
    if prob.shape == (height, width):
        return prob.copy()
    resized = cv2.resize(prob, (width, height), interpolation=cv2.INTER_LINEAR)
    return np.clip(resized, 0.0, 1.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected foreground component of a boolean mask (empty stays empty)."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return np.zeros_like(mask, dtype=bool)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    return labels == largest


@dataclass(eq=False)
class PostProcess:
    """Turn a lesion probability map into a binary mask (see the module docstring for the steps).

    Args:
        threshold: a pixel is foreground where ``prob > threshold``.
        opening_radius: disk radius in pixels of the map being thresholded (the original size when ``size``
            is passed to ``__call__``); 0 disables.
        min_size: drop components of fewer pixels (0 disables); useful with ``largest_component=False``.
        fallback: when nothing survives, return the connected region around the argmax where the
            probability is at least half its maximum (an all-zero map still gives an empty mask).

    Raises:
        ValueError: on a threshold outside [0, 1) or a negative radius/size.

    Example:
        >>> post = PostProcess(threshold=0.5, opening_radius=2)
        >>> mask = post(prob_224, size=(orig_width, orig_height))  # bool (orig_height, orig_width)
    """

    threshold: float = 0.5
    fill_holes: bool = True
    largest_component: bool = True
    opening_radius: int = 0
    min_size: int = 0
    fallback: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {self.threshold}")
        if self.opening_radius < 0:
            raise ValueError(f"opening_radius must be >= 0, got {self.opening_radius}")
        if self.min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {self.min_size}")

    def __call__(self, prob: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Post-process one (H,W) float probability map, or ``bool`` mask (no threshold), to an (H,W) bool mask.

        ``size``: ``(width, height)`` to resize the map to first.

        Raises:
            ValueError: if ``prob`` is not 2-D, or is neither float nor bool.
        """
        prob = np.asarray(prob)
        if prob.ndim != 2 or prob.size == 0:
            raise ValueError(f"prob must be a non-empty 2-D (H,W) array, got shape {prob.shape}")
        if prob.dtype == bool:
            if size is not None:
                width, height = size
                prob = cv2.resize(prob.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
            mask = prob.copy()
        elif np.issubdtype(prob.dtype, np.floating):
            if size is not None:
                prob = resize_probability(prob, size)
            mask = prob > self.threshold
        else:
            raise ValueError(f"prob must be a float probability map or a bool mask, got dtype {prob.dtype}")

        if self.opening_radius > 0:
            side = 2 * self.opening_radius + 1
            kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (side, side))
            mask = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)
        if self.min_size > 0:
            _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
            keep = stats[:, cv2.CC_STAT_AREA] >= self.min_size
            keep[0] = False  # background
            mask = keep[labels]
        if self.largest_component:
            mask = largest_component(mask)
        if not mask.any() and self.fallback and prob.dtype != bool and prob.max() > 0:
            # the connected region around the most probable pixel where the probability is at least half its maximum
            _, labels = cv2.connectedComponents((prob >= 0.5 * prob.max()).astype(np.uint8), connectivity=8)
            mask = labels == labels[np.unravel_index(int(np.argmax(prob)), prob.shape)]
        if self.fill_holes and mask.any():
            mask = ndimage.binary_fill_holes(mask)
        return mask
