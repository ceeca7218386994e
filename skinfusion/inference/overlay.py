"""Overlays for people: the lesion contour, an attention heat map and a text strip drawn on the image."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from skinfusion.inference.predictor import Prediction

__all__ = ["heatmap", "prediction_overlay", "render_overlay"]


def heatmap(image: np.ndarray, attention: np.ndarray, alpha: float = 0.35) -> np.ndarray:
    """Blend an attention map over an image as a heat map: upsampled bilinearly, min-max scaled, JET colours.

    Shape:
        image (H,W,3) uint8 RGB, attention (h,w) of any size -> (H,W,3) uint8.
    """
    height, width = image.shape[:2]
    heat = cv2.resize(np.asarray(attention, dtype=np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    low, high = float(heat.min()), float(heat.max())
    heat = (heat - low) / (high - low) if high > low else np.zeros_like(heat)
    colored = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return cv2.addWeighted(np.ascontiguousarray(image), 1.0 - alpha, np.ascontiguousarray(colored), alpha, 0.0)


def render_overlay(
    image: np.ndarray,
    mask: np.ndarray | None = None,
    attention: np.ndarray | None = None,
    lines: Sequence[str] = (),
    alpha: float = 0.35,
    contour_color: tuple[int, int, int] = (0, 255, 0),
    extra_mask: np.ndarray | None = None,
    extra_color: tuple[int, int, int] = (255, 0, 255),
) -> np.ndarray:
    """Draw a lesion contour, an attention heat map and a text strip on an image, for people.

    Args:
        image: (H,W,3) uint8 RGB.
        mask: boolean mask of any size (resized to the image, nearest); its outer contour is drawn.
        attention: a (h,w) map of any size, drawn by :func:`heatmap` with weight ``alpha``.
        lines: text lines written on a white strip added below the image (e.g. the top-3 classes).
        alpha: heat-map weight.
        contour_color: RGB colour of the ``mask`` contour.
        extra_mask: a second mask whose contour is drawn in ``extra_color`` (e.g. the truth).
        extra_color: RGB colour of the ``extra_mask`` contour.

    Returns:
        (H + strip, W, 3) uint8 RGB; no strip when ``lines`` is empty.
    """
    canvas = np.ascontiguousarray(image[..., :3]).copy()
    height, width = canvas.shape[:2]
    if attention is not None:
        canvas = heatmap(canvas, attention, alpha)
    thickness = max(1, round(max(height, width) / 250))
    for outline, color in ((extra_mask, extra_color), (mask, contour_color)):
        if outline is None:
            continue
        outline = np.asarray(outline, dtype=np.uint8)
        if outline.shape != (height, width):
            outline = cv2.resize(outline, (width, height), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(outline, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(canvas, contours, -1, color, thickness)
    if not lines:
        return canvas
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = float(np.clip(width / 500, 0.3, 1.5))
    for line in lines:  # shrink until the longest line fits
        while scale > 0.2 and cv2.getTextSize(line, font, scale, 1)[0][0] > width - 6:
            scale *= 0.9
    text_thickness = max(1, round(scale * 1.5))
    line_height = cv2.getTextSize("Ag", font, scale, text_thickness)[0][1] * 2
    strip = np.full((line_height * len(lines) + line_height // 2, width, 3), 255, np.uint8)
    for row, line in enumerate(lines):
        cv2.putText(strip, line, (3, line_height * (row + 1)), font, scale, (0, 0, 0), text_thickness, cv2.LINE_AA)
    return np.concatenate([canvas, strip], axis=0)


def prediction_overlay(
    prediction: Prediction, attention_map: str | None = None, max_side: int | None = None, alpha: float = 0.35
) -> np.ndarray:
    """The overlay image of one :class:`Prediction` (re-reads its image file)."""
    from skinfusion.data.imageio import read_image
    from skinfusion.inference.explain import pick_attention

    image = read_image(prediction.image, max_side=max_side)  # longest side at most max_side
    lines = [f"{name} {prob:.1%}" for name, prob in prediction.top_k(3)]
    if prediction.mask is not None:
        lines.append(f"lesion {prediction.mask_area:.1%}")
    if prediction.heat is not None:  # an explanation asked for is what the overlay shows
        heat = prediction.heat
        lines.append(f"heat: {prediction.explain_method} of {prediction.predicted_class}")
    else:
        heat = pick_attention(prediction.attention, attention_map)
    return render_overlay(image, prediction.mask, heat, lines, alpha=alpha)
