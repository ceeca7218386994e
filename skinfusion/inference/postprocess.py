"""Mask post-processing: from a lesion probability map to a clean binary mask.

The paper post-processes the decoder's output to remove artefacts; here that is a configurable
chain run in this order:

1. (optional) bilinear resize of the *probability* map to the original image size, so that the
   threshold is applied at full resolution rather than upsampling a blocky low-res mask;
2. threshold (``prob > threshold``);
3. morphological opening with a disk of ``opening_radius`` pixels (removes thin spurs, hair-like
   strands and specks narrower than the disk);
4. removal of connected components (8-connectivity) smaller than ``min_size`` pixels, and/or
   keeping only the largest component (a dermoscopic image shows one lesion);
5. filling of holes (background regions not connected to the image border).

If nothing survives steps 2-4 the mask stays empty (an empty prediction is a legitimate answer
and the ISIC scorer rates it 1.0 on an empty truth). With ``fallback=True`` an empty result is
replaced by the connected region around the most probable pixel where the probability is at least
half its maximum, for callers that know every image shows a lesion.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage


def resize_probability(prob: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a probability map bilinearly (before thresholding).

    Args:
        prob: HxW float probability map.
        size: target ``(width, height)``, as PIL and OpenCV order it (the original image size).

    Returns:
        float32 ``(height, width)`` map, values clipped to [0, 1].

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


def remove_small_components(mask: np.ndarray, min_size: int) -> np.ndarray:
    """Drop 8-connected foreground components of fewer than ``min_size`` pixels."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_size
    keep[0] = False  # background
    return keep[labels]


def binary_opening(mask: np.ndarray, radius: int) -> np.ndarray:
    """Morphological opening with a disk of ``radius`` pixels (``radius`` 0: unchanged)."""
    if radius <= 0:
        return mask.copy()
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    return cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_OPEN, kernel).astype(bool)


class PostProcess:
    """Turn a lesion probability map into a binary mask (see the module docstring for the steps).

    Args:
        threshold: a pixel is foreground where ``prob > threshold``.
        fill_holes: fill background regions enclosed by the lesion.
        largest_component: keep only the largest 8-connected component.
        opening_radius: radius in pixels of the disk used for a morphological opening; 0 disables.
            The radius is in pixels of the map being thresholded (the original size when ``size``
            is passed to ``__call__``).
        min_size: drop components of fewer pixels (0 disables); useful with
            ``largest_component=False``.
        fallback: when nothing survives, return the connected region around the argmax where the
            probability is at least half its maximum instead of an empty mask (an all-zero map
            still gives an empty mask).

    Raises:
        ValueError: on a threshold outside [0, 1) or a negative radius/size.

    Example:
        >>> post = PostProcess(threshold=0.5, opening_radius=2)
        >>> mask = post(prob_224, size=(orig_width, orig_height))  # bool (orig_height, orig_width)
    """

    def __init__(
        self,
        threshold: float = 0.5,
        fill_holes: bool = True,
        largest_component: bool = True,
        opening_radius: int = 0,
        min_size: int = 0,
        fallback: bool = False,
    ) -> None:
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        if opening_radius < 0:
            raise ValueError(f"opening_radius must be >= 0, got {opening_radius}")
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}")
        self.threshold = threshold
        self.fill_holes = fill_holes
        self.largest_component = largest_component
        self.opening_radius = opening_radius
        self.min_size = min_size
        self.fallback = fallback

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(threshold={self.threshold}, fill_holes={self.fill_holes}, "
            f"largest_component={self.largest_component}, opening_radius={self.opening_radius}, "
            f"min_size={self.min_size}, fallback={self.fallback})"
        )

    def __call__(self, prob: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
        """Post-process one map.

        Args:
            prob: HxW float probability map, or an HxW ``bool`` mask (then no threshold is applied).
            size: optional ``(width, height)`` to resize the probability map to first.

        Returns:
            HxW (or ``size``) boolean mask.

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

        mask = binary_opening(mask, self.opening_radius)
        if self.min_size > 0:
            mask = remove_small_components(mask, self.min_size)
        if self.largest_component:
            mask = largest_component(mask)
        if not mask.any() and self.fallback and prob.dtype != bool:
            mask = self._fallback_region(prob)
        if self.fill_holes and mask.any():
            mask = ndimage.binary_fill_holes(mask)
        return mask

    @staticmethod
    def _fallback_region(prob: np.ndarray) -> np.ndarray:
        peak = float(prob.max())
        if peak <= 0.0:
            return np.zeros(prob.shape, dtype=bool)
        _, labels = cv2.connectedComponents((prob >= 0.5 * peak).astype(np.uint8), connectivity=8)
        row, col = np.unravel_index(int(np.argmax(prob)), prob.shape)
        return labels == labels[row, col]
