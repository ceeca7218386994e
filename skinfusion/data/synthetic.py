"""Procedural dermoscopy-like images with exact lesion masks, for tests and the quick start.

Each sample is a skin-coloured field (texture, vignette, sometimes hair and the dark circle of a
dermoscope) with one lesion: a circle whose radius is perturbed by a few Fourier harmonics, so its
mask is known exactly. Size, border, colours and texture follow the class, loosely after the
dermoscopic criteria of the seven ISIC 2018 classes; colours vary within a class and some samples
borrow another class's colour, so the task is learnable but not trivial.

Everything about sample ``i`` (class, split, annotation kind, pixels) comes from random streams
seeded by ``(seed, i)``, so a sample is the same whatever the order or the number generated.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from skinfusion.data.dataset import SITES
from skinfusion.data.readers import ManifestReader
from skinfusion.data.records import ISIC_CLASSES, MANIFEST_COLUMNS, Record
from skinfusion.data.split import SPLITS, normalized_fractions
from skinfusion.io import atomic_write

#: Bump when the rendering changes, so that cached synthetic folders are rebuilt.
SYNTHETIC_VERSION = 1


# Random streams of one sample: one per purpose, so that overriding the class does not change
# the pixels' randomness and the split does not depend on the rendering.
_STREAM_CLASS, _STREAM_PIXELS, _STREAM_SPLIT, _STREAM_ANNOTATION, _STREAM_META = range(5)


@dataclass(frozen=True)
class _Style:
    """Appearance of one class (colours are RGB in [0, 1])."""

    colour: tuple[float, float, float]
    radius: tuple[float, float]  # fraction of half the image side
    irregularity: tuple[float, float]  # amplitude of the radial Fourier perturbation
    blotches: tuple[tuple[float, float, float], ...] = ()  # secondary colours
    n_blotches: tuple[int, int] = (0, 0)
    texture: float = 0.05  # amplitude of the multiplicative texture
    texture_cells: int = 6  # coarseness of the texture (noise cells across the image)
    softness: float = 1.0  # edge blur, in pixels at 128 px
    vessels: float = 0.0  # probability of branching red vessels
    globules: tuple[float, float, float] | None = None  # colour of round nests / lobules
    n_globules: tuple[int, int] = (0, 0)
    scale: float = 0.0  # white scale (fraction of lesion pixels)
    ring: float = 0.0  # probability of a pigment ring round a pale centre
    dark_centre: float = 0.0  # darkening toward the centre
    age: tuple[float, float] = (50.0, 15.0)  # mean and sd of the synthetic patient age


_STYLES: dict[str, _Style] = {
    "MEL": _Style(
        colour=(0.36, 0.23, 0.16),
        radius=(0.45, 0.78),
        irregularity=(0.12, 0.28),
        blotches=((0.08, 0.06, 0.06), (0.42, 0.47, 0.58), (0.55, 0.25, 0.2), (0.62, 0.45, 0.35)),
        n_blotches=(2, 5),
        texture=0.15,
        texture_cells=10,
        age=(60.0, 15.0),
    ),
    "NV": _Style(
        colour=(0.52, 0.35, 0.23),
        radius=(0.3, 0.6),
        irregularity=(0.02, 0.08),
        blotches=((0.4, 0.26, 0.17),),
        n_blotches=(0, 1),
        texture_cells=8,
        softness=1.5,
        dark_centre=0.2,
        age=(40.0, 15.0),
    ),
    "BCC": _Style(
        colour=(0.82, 0.58, 0.57),
        radius=(0.3, 0.6),
        irregularity=(0.06, 0.15),
        texture=0.06,
        softness=1.5,
        vessels=0.85,
        globules=(0.42, 0.44, 0.55),
        n_globules=(1, 5),
        age=(66.0, 12.0),
    ),
    "AKIEC": _Style(
        colour=(0.8, 0.5, 0.45),
        radius=(0.4, 0.72),
        irregularity=(0.08, 0.18),
        texture=0.1,
        texture_cells=16,
        softness=3.0,
        scale=0.12,
        vessels=0.15,
        age=(67.0, 12.0),
    ),
    "BKL": _Style(
        colour=(0.66, 0.5, 0.36),
        radius=(0.35, 0.7),
        irregularity=(0.05, 0.12),
        blotches=((0.5, 0.36, 0.25),),
        n_blotches=(0, 2),
        texture=0.22,
        texture_cells=20,
        softness=0.8,
        globules=(0.93, 0.9, 0.82),
        n_globules=(0, 4),
        age=(58.0, 14.0),
    ),
    "DF": _Style(
        colour=(0.6, 0.43, 0.33),
        radius=(0.2, 0.38),
        irregularity=(0.02, 0.07),
        texture=0.06,
        softness=2.0,
        ring=0.85,
        age=(45.0, 14.0),
    ),
    "VASC": _Style(
        colour=(0.68, 0.2, 0.3),
        radius=(0.2, 0.45),
        irregularity=(0.03, 0.1),
        blotches=((0.45, 0.13, 0.33),),
        n_blotches=(0, 2),
        softness=0.8,
        globules=(0.45, 0.08, 0.15),
        n_globules=(2, 6),
        age=(50.0, 18.0),
    ),
}
_STYLE_ORDER: tuple[str, ...] = ISIC_CLASSES

#: Probability that a lesion borrows the colour of another class (class overlap).
_CONFUSION = 0.12


def _stream(seed: int, index: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng((int(seed), int(index), purpose))


def synthetic_class(index: int, seed: int, num_classes: int = len(ISIC_CLASSES)) -> int:
    """Class index of synthetic sample ``index`` (uniform over ``num_classes``)."""
    return int(_stream(seed, index, _STREAM_CLASS).integers(num_classes))


def _style_for(class_index: int) -> _Style:
    # Class lists other than ISIC's borrow the ISIC styles in order (cycling).
    return _STYLES[_STYLE_ORDER[class_index % len(_STYLE_ORDER)]]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-sd noise varying over about ``size / cells`` pixels."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def _blob_polygon(
    rng: np.random.Generator, centre: np.ndarray, radius: float, irregularity: float, size: int
) -> np.ndarray:
    """Vertices of a circle whose radius is perturbed by harmonics 2..8 (amplitude ~ irregularity)."""
    theta = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
    factor = np.ones_like(theta)
    elongation = rng.uniform(0.0, 0.15)
    factor += elongation * np.cos(2 * theta + rng.uniform(0, 2 * np.pi))
    for k in range(2, 9):
        amp = irregularity * rng.standard_normal() / k**0.6
        factor += amp * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    r = radius * np.clip(factor, 0.35, 1.7)
    points = centre[None, :] + np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    return np.clip(points, 1, size - 2)


def _draw_hair(rng: np.random.Generator, image: np.ndarray, count: int) -> None:
    size = image.shape[0]
    thickness = max(1, round(size / 160))
    for _ in range(count):
        p0, p1, p2 = rng.uniform(-0.1 * size, 1.1 * size, size=(3, 2))
        t = np.linspace(0.0, 1.0, 24)[:, None]
        curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2  # quadratic Bezier
        shade = rng.uniform(0.05, 0.3)
        colour = (shade, shade * 0.8, shade * 0.7)
        cv2.polylines(image, [np.round(curve).astype(np.int32)], False, colour, thickness, cv2.LINE_AA)


def _draw_vessels(rng: np.random.Generator, layer: np.ndarray, centre: np.ndarray, radius: float) -> None:
    size = layer.shape[0]
    thickness = max(1, round(size / 128))
    for _ in range(rng.integers(2, 5)):
        point = centre + rng.uniform(-0.6, 0.6, 2) * radius
        angle = rng.uniform(0, 2 * np.pi)
        for _ in range(rng.integers(3, 7)):
            angle += rng.normal(0.0, 0.6)
            step = rng.uniform(0.15, 0.35) * radius
            nxt = point + step * np.array([np.cos(angle), np.sin(angle)])
            cv2.line(layer, tuple(np.round(point).astype(int)), tuple(np.round(nxt).astype(int)), 1.0, thickness)
            point = nxt


def make_lesion(
    index: int, seed: int = 0, size: int = 128, class_index: int | None = None, num_classes: int = len(ISIC_CLASSES)
) -> tuple[np.ndarray, np.ndarray, int]:
    """Render synthetic sample ``index``.

    ``(index, seed)`` fix everything about the sample; ``class_index`` forces a class (by default it
    is drawn uniformly, see :func:`synthetic_class`); classes beyond the seven ISIC styles reuse them
    in order. Returns ``(image, mask, label)``: image uint8 (size, size, 3) RGB, mask uint8
    (size, size) in {0, 1}, label the class index.

    Raises:
        ValueError: for a size below 16, a non-positive number of classes or a class out of range.
    """
    if size < 16:
        raise ValueError(f"size must be at least 16, got {size}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    label = synthetic_class(index, seed, num_classes) if class_index is None else int(class_index)
    if not 0 <= label < num_classes:
        raise ValueError(f"class_index must be in [0, {num_classes}), got {class_index}")
    style = _style_for(label)
    rng = _stream(seed, index, _STREAM_PIXELS)
    px = size / 128.0  # lengths below are given at 128 px

    # Skin: a tone per image, low-frequency mottling, vignette.
    skin = np.array([0.9, 0.7, 0.6], np.float32) * rng.uniform(0.85, 1.05)
    skin = np.clip(skin * rng.uniform(0.95, 1.05, 3), 0, 1).astype(np.float32)
    image = np.broadcast_to(skin, (size, size, 3)).copy()
    image *= (1.0 + 0.04 * _smooth_noise(rng, size, 4))[..., None]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    r2 = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2) / (size / 2) ** 2
    image *= (1.0 - rng.uniform(0.05, 0.35) * np.clip(r2, 0, 2) / 2)[..., None]

    # Lesion outline and its exact mask.
    radius = rng.uniform(*style.radius) * size / 2
    centre = size / 2 + rng.uniform(-0.12, 0.12, 2) * size
    polygon = _blob_polygon(rng, centre, radius, rng.uniform(*style.irregularity), size)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(polygon * 16).astype(np.int32)], 1, cv2.LINE_8, shift=4)
    if not mask.any():  # cannot happen for size >= 16, but keep the contract: one lesion
        cv2.circle(mask, (size // 2, size // 2), 2, 1, -1)
    inside = mask.astype(np.float32)

    # Lesion colour field: base colour (sometimes another class's), texture, shading.
    if rng.random() < _CONFUSION:
        base = np.array(_STYLES[_STYLE_ORDER[rng.integers(len(_STYLE_ORDER))]].colour, np.float32)
    else:
        base = np.array(style.colour, np.float32)
    base = np.clip(base + rng.normal(0.0, 0.05, 3).astype(np.float32), 0.02, 0.98)
    lesion = np.broadcast_to(base, (size, size, 3)).copy()
    lesion *= (1.0 + style.texture * _smooth_noise(rng, size, style.texture_cells))[..., None]
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, 3)
    depth = dist / max(float(dist.max()), 1.0)  # 0 at the border, 1 at the deepest point
    if style.dark_centre:
        lesion *= (1.0 - style.dark_centre * depth)[..., None]

    def paint(region: np.ndarray, colour: Any, strength: float) -> None:
        """Blend ``colour`` into the lesion where ``region`` (float HxW in [0,1]) is set."""
        weight = (strength * region * inside)[..., None]
        lesion[:] = lesion * (1 - weight) + np.asarray(colour, np.float32) * weight

    for _ in range(rng.integers(style.n_blotches[0], style.n_blotches[1] + 1)):
        blotch = np.zeros((size, size), np.float32)
        where = tuple(np.round(centre + rng.uniform(-0.6, 0.6, 2) * radius).astype(int))
        axes = (max(1, round(radius * rng.uniform(0.2, 0.5))), max(1, round(radius * rng.uniform(0.15, 0.4))))
        cv2.ellipse(blotch, where, axes, rng.uniform(0, 180), 0, 360, 1.0, -1)
        blotch = cv2.GaussianBlur(blotch, (0, 0), 2.0 * px)
        paint(blotch, style.blotches[rng.integers(len(style.blotches))], rng.uniform(0.6, 0.9))
    if style.globules is not None:
        for _ in range(rng.integers(style.n_globules[0], style.n_globules[1] + 1)):
            dot = np.zeros((size, size), np.float32)
            where = centre + rng.uniform(-0.6, 0.6, 2) * radius
            cv2.circle(dot, tuple(np.round(where).astype(int)), max(1, round(rng.uniform(1.5, 4.5) * px)), 1.0, -1)
            paint(cv2.GaussianBlur(dot, (0, 0), 0.8 * px), style.globules, 0.85)
    if rng.random() < style.ring:
        ring = np.exp(-(((depth - 0.25) / 0.15) ** 2))
        paint(ring, (0.45, 0.3, 0.22), 0.7)
        paint(np.clip((depth - 0.55) / 0.25, 0, 1), (0.95, 0.9, 0.85), 0.85)
    if rng.random() < style.vessels:
        vessels = np.zeros((size, size), np.float32)
        _draw_vessels(rng, vessels, centre, radius)
        paint(vessels, (0.75, 0.12, 0.18), 0.85)
    if style.scale:
        speckle = (rng.random((size, size)) < style.scale).astype(np.float32)
        speckle = cv2.GaussianBlur(speckle, (0, 0), 0.7 * px)
        paint(np.clip(speckle * 2, 0, 1), (0.96, 0.94, 0.9), 0.8)

    # Composite with a soft edge whose half level is the mask's outline.
    alpha = cv2.GaussianBlur(inside, (0, 0), style.softness * px)[..., None]
    alpha = np.clip(alpha * rng.uniform(0.8, 1.0), 0, 1)
    image = image * (1 - alpha) + lesion * alpha

    _draw_hair(rng, image, int(rng.choice([0, 0, 0, 1, 2, 4])))
    if rng.random() < 0.2:  # the dark circle of a contact dermoscope
        scope = np.clip((np.sqrt(r2) - 1.15) * 8, 0, 1)[..., None]
        image *= 1 - scope
    image += rng.normal(0.0, 0.015, image.shape).astype(np.float32)
    return np.clip(image * 255.0 + 0.5, 0, 255).astype(np.uint8), mask, label


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def synthetic_rows(
    n: int,
    seed: int = 0,
    class_names: Sequence[str] = ISIC_CLASSES,
    mask_fraction: float = 1.0,
    label_fraction: float = 1.0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> list[dict[str, str]]:
    """Manifest rows of a synthetic data set, computed without rendering any pixel.

    Row ``i`` has class, split (``fractions``: train/val/test), annotation kind and metadata fixed by
    ``(seed, i)``. A sample has a mask with probability ``mask_fraction`` and a label with probability
    ``label_fraction``; every sample has at least one of the two (hence the fractions must add up to at
    least 1). The number of ``class_names`` sets the number of classes.

    Raises:
        ValueError: for ``n < 1``, fractions outside [0, 1], ``mask_fraction + label_fraction < 1``,
            or split fractions that are not three non-negative numbers with a positive sum.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    _check_fraction("mask_fraction", mask_fraction)
    _check_fraction("label_fraction", label_fraction)
    if mask_fraction + label_fraction < 1.0:
        raise ValueError(
            f"mask_fraction + label_fraction must be >= 1 so that every sample has an annotation, "
            f"got {mask_fraction} + {label_fraction}"
        )
    split_edges = np.cumsum(normalized_fractions(fractions))[:-1]
    rows = []
    for i in range(n):
        sample_id = f"SYN_{i:06d}"
        label = synthetic_class(i, seed, len(class_names))
        # One uniform draw decides the annotation kind: [0, mask_fraction) has a mask,
        # [1 - label_fraction, 1) has a label; the two ranges cover [0, 1) together.
        kind = _stream(seed, i, _STREAM_ANNOTATION).random()
        has_mask = kind < mask_fraction
        has_label = kind >= 1.0 - label_fraction
        split = SPLITS[int(np.searchsorted(split_edges, _stream(seed, i, _STREAM_SPLIT).random(), side="right"))]
        meta_rng = _stream(seed, i, _STREAM_META)
        age_mean, age_sd = _style_for(label).age
        age = float(np.clip(round(meta_rng.normal(age_mean, age_sd) / 5) * 5, 5, 90))
        rows.append(
            {
                "id": sample_id,
                "image": f"images/{sample_id}.png",
                "mask": f"masks/{sample_id}_segmentation.png" if has_mask else "",
                "label": class_names[label] if has_label else "",
                "lesion_id": "",
                "split": split,
                "source": "synthetic",
                "age": f"{age:.1f}" if meta_rng.random() > 0.05 else "",
                "sex": str(meta_rng.choice(["male", "female", ""], p=[0.48, 0.48, 0.04])),
                "site": str(meta_rng.choice([*SITES, ""])),
            }
        )
    return rows


def write_synthetic(
    root: str | Path,
    n: int,
    seed: int = 0,
    size: int = 128,
    class_names: Sequence[str] = ISIC_CLASSES,
    mask_fraction: float = 1.0,
    label_fraction: float = 1.0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> list[Record]:
    """Write the data set of :func:`synthetic_rows` to ``root`` as PNG files (``size`` pixels square) plus a
    prepared ``manifest.csv``, and return one :class:`Record` per sample (``meta["split"]`` holds its split).

    The folder is reused as it is when it already holds a data set written with the same
    parameters (recorded in ``synthetic.json``, written last); otherwise it is (re)written.

    Raises:
        ValueError: as :func:`synthetic_rows`, or for a size below 16.
    """
    root = Path(root).expanduser()
    params = {
        "version": SYNTHETIC_VERSION,
        "n": int(n),
        "seed": int(seed),
        "size": int(size),
        "class_names": list(class_names),
        "mask_fraction": float(mask_fraction),
        "label_fraction": float(label_fraction),
        "fractions": [float(f) for f in fractions],
    }
    rows = synthetic_rows(n, seed, class_names, mask_fraction, label_fraction, fractions)
    stamp = root / "synthetic.json"
    manifest = root / "manifest.csv"
    reuse = stamp.is_file() and manifest.is_file() and json.loads(stamp.read_text()) == params
    if not reuse:
        if size < 16:
            raise ValueError(f"size must be at least 16, got {size}")
        stamp.unlink(missing_ok=True)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        for i, row in enumerate(rows):
            image, mask, _ = make_lesion(i, seed, size, class_index=None, num_classes=len(class_names))
            _write_png(root / row["image"], image[..., ::-1])
            if row["mask"]:
                _write_png(root / row["mask"], mask * 255)
            row.update(
                orig_image=str((root / row["image"]).resolve()),
                orig_mask=str((root / row["mask"]).resolve()) if row["mask"] else "",
                orig_width=str(size),
                orig_height=str(size),
            )
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(manifest, buffer.getvalue())
        stamp.write_text(json.dumps(params, indent=1))
    return _records(root, rows)


def synthetic_records(
    root: str | Path,
    n: int,
    seed: int = 0,
    class_names: Sequence[str] = ISIC_CLASSES,
    mask_fraction: float = 1.0,
    label_fraction: float = 1.0,
    fractions: Sequence[float] = (0.7, 0.15, 0.15),
) -> list[Record]:
    """The records :func:`write_synthetic` returns for the same arguments, without touching the disk.

    Lets class counts and splits be known before the files exist (e.g. class weights at
    configuration time). Each record's ``meta["split"]`` holds its split.
    """
    root = Path(root).expanduser()
    return _records(root, synthetic_rows(n, seed, class_names, mask_fraction, label_fraction, fractions))


def _write_png(path: Path, array: np.ndarray) -> None:
    if not cv2.imwrite(str(path), np.ascontiguousarray(array)):
        raise OSError(f"could not write {path}")


def _records(root: Path, rows: list[dict[str, str]]) -> list[Record]:
    return ManifestReader(root / "manifest.csv", source_column="source").records(enumerate(rows, start=2))
