"""Robust image and mask loading, shared by the readers, ``prepare`` and the Dataset.

Every failure becomes a :class:`~skinfusion.errors.DataError` naming the file and the reason. Policies:

* **EXIF orientation** is applied: images come back upright and :func:`image_size` reports the
  upright size, which is what a mask is compared against.
* **Modes**: grayscale is replicated to 3 channels, palette images are mapped through the palette,
  alpha is dropped (not composited), CMYK/YCbCr become RGB, 16-bit grayscale is scaled linearly to
  8 bits; float images (``F``) are rejected.
* **Masks** must be single-channel and binary (``{0, 255}``, ``{0, 1}``, 16-bit ``{0, 65535}``); an
  RGB(A) mask is accepted only when its colour channels are identical. They come back ``uint8`` {0, 1}.
* **Decompression bombs**: images above ``max_pixels`` (default 100 MP) are rejected from the header.
* **Truncated / corrupt files** are detected by a full decode (keep Pillow's ``LOAD_TRUNCATED_IMAGES`` off).
* **Reduced-resolution decoding**: a JPEG read with a much smaller ``max_side`` is decoded at 1/2, 1/4
  or 1/8 scale (``Image.draft``, never below the target), then resized with area interpolation.
"""

from __future__ import annotations

import math
import struct
import warnings
import zlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from skinfusion.errors import DataError

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "image_size",
    "read_image",
    "read_mask",
    "resize_image",
    "resize_mask",
    "target_size",
]

#: Images above this many pixels are rejected as possible decompression bombs (100 MP).
DEFAULT_MAX_PIXELS: int = 100_000_000

#: File extensions the folder readers treat as images (lower case).
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

# Exceptions Pillow and its codecs raise on corrupt data.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, IndexError)
# EXIF orientations that swap width and height.
_TRANSPOSING_ORIENTATIONS = {5, 6, 7, 8}


def _open(path: str | Path, max_pixels: int | None) -> Image.Image:
    """Open ``path`` lazily (header only) with every failure mapped to ``DataError``."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise DataError(path, "file not found") from None
    except OSError as err:
        raise DataError(path, f"cannot access file: {err}") from None
    if not path.is_file():
        raise DataError(path, "not a regular file")
    if size == 0:
        raise DataError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own pixel limit below replaces Pillow's warning; its hard error is still caught.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except Image.DecompressionBombError as err:
        raise DataError(path, f"image too large (decompression bomb guard): {err}") from None
    except UnidentifiedImageError:
        raise DataError(path, "not a recognised image (corrupt or unsupported format)") from None
    except _DECODE_ERRORS as err:
        raise DataError(path, f"truncated or corrupt image header: {err}") from None
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        img.close()
        raise DataError(path, f"image too large: {w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    if w == 0 or h == 0:
        img.close()
        raise DataError(path, f"image has zero size {w}x{h}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a broken EXIF block must not make a good image unreadable
        return 1


def image_size(path: str | Path, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Return the upright ``(width, height)`` of an image from its header (EXIF orientation applied).

    Raises:
        DataError: missing, empty, unrecognised or too large (``max_pixels``) file.
    """
    with _open(path, max_pixels) as img:
        w, h = img.size
        if _orientation(img) in _TRANSPOSING_ORIENTATIONS:
            w, h = h, w
        return w, h


def target_size(width: int, height: int, size: int | None, side: str = "longest") -> tuple[int, int]:
    """Size ``(w, h)`` after an aspect-preserving downscale so that one side equals ``size``.

    ``side`` is ``"longest"`` (fit inside ``size`` x ``size``) or ``"shortest"`` (cover it); ``size=None``
    keeps the original size. Never upscales; each side is at least 1.
    """
    if side not in ("longest", "shortest"):
        raise ValueError(f"side must be 'longest' or 'shortest', got {side!r}")
    if size is None:
        return width, height
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    ref = max(width, height) if side == "longest" else min(width, height)
    if ref <= size:
        return width, height
    scale = size / ref
    return max(1, round(width * scale)), max(1, round(height * scale))


def _load(img: Image.Image, path: Path, draft_size: tuple[int, int] | None) -> Image.Image:
    """Force a full decode (optionally at reduced JPEG scale) and apply the EXIF orientation."""
    try:
        if draft_size is not None and img.format == "JPEG":
            img.draft("RGB" if img.mode in ("RGB", "YCbCr") else img.mode, draft_size)
        img.load()
        return ImageOps.exif_transpose(img)
    except Image.DecompressionBombError as err:
        raise DataError(path, f"image too large (decompression bomb guard): {err}") from None
    except _DECODE_ERRORS as err:
        raise DataError(path, f"truncated or corrupt image: {err}") from None


def _draft_size(img: Image.Image, size: int | None, side: str) -> tuple[int, int] | None:
    if size is None:
        return None
    w, h = img.size  # stored orientation; the longest/shortest side does not depend on it
    tw, th = target_size(w, h, size, side)
    if (tw, th) == (w, h):
        return None
    # draft picks the smallest DCT scale whose result is still >= the requested size.
    return math.ceil(tw), math.ceil(th)


def _to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        arr = np.asarray(img)
        if arr.dtype != np.uint16 and (arr.min() < 0 or arr.max() > 65535):
            raise DataError(path, f"unsupported {mode} image with values outside 0..65535")
        gray = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if mode == "F":
        raise DataError(path, "unsupported floating-point image (mode F)")
    if mode == "RGB":
        return np.asarray(img)
    if mode == "P":
        img = img.convert("RGBA")  # honours palette transparency without Pillow's warning
    return np.asarray(img.convert("RGB"))


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an ``HxWxC`` uint8 image to ``size=(w, h)`` with area (down) / linear (up) interpolation."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    interp = cv2.INTER_AREA if size[0] <= w and size[1] <= h else cv2.INTER_LINEAR
    return cv2.resize(image, tuple(size), interpolation=interp)


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a ``{0,1}`` mask to ``size=(w, h)``, keeping it binary.

    Downscaling averages the covered pixels and thresholds at 0.5 (smoother than nearest
    neighbour); upscaling uses nearest neighbour.
    """
    h, w = mask.shape[:2]
    if (w, h) == tuple(size):
        return mask
    if size[0] <= w and size[1] <= h:
        area = cv2.resize(mask.astype(np.float32), tuple(size), interpolation=cv2.INTER_AREA)
        return (area >= 0.5).astype(np.uint8)
    return cv2.resize(mask, tuple(size), interpolation=cv2.INTER_NEAREST)


def read_image(
    path: str | Path,
    max_side: int | None = None,
    *,
    side: str = "longest",
    reduce: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Read an image as upright ``uint8`` RGB ``(H, W, 3)`` (see the module docstring for the policies).

    Args:
        max_side: when given, downscale (aspect preserved, never upscale) so that the side chosen
            by ``side`` (``"longest"`` or ``"shortest"``) is at most ``max_side``.
        reduce: decode large JPEGs at reduced DCT scale when ``max_side`` allows (fast path).
        max_pixels: decompression-bomb limit; ``None`` disables it.

    Raises:
        DataError: missing, empty, truncated, corrupt, unsupported or too large file.
    """
    path = Path(path)
    with _open(path, max_pixels) as img:
        draft = _draft_size(img, max_side, side) if reduce else None
        loaded = _load(img, path, draft)
        rgb = _to_rgb(loaded, path)
    if max_side is not None:
        h, w = rgb.shape[:2]
        rgb = resize_image(rgb, target_size(w, h, max_side, side))
    return np.ascontiguousarray(rgb)


def _binary(values: np.ndarray, path: Path, arr: np.ndarray) -> np.ndarray:
    vals = {int(v) for v in values}
    for high in (255, 1, 65535):
        if vals <= {0, high}:
            return (arr == high).astype(np.uint8) if high != 1 else arr.astype(np.uint8)
    shown = sorted(vals)
    listing = ", ".join(str(v) for v in shown[:8]) + (f", ... ({len(shown)} distinct)" if len(shown) > 8 else "")
    raise DataError(path, f"mask is not binary: values {{{listing}}} (expected {{0,255}} or {{0,1}})")


def read_mask(
    path: str | Path, size: tuple[int, int] | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Read a binary lesion mask as ``uint8`` ``{0,1}`` of shape ``(H, W)``.

    Args:
        size: when given, ``(w, h)`` to resize to (see :func:`resize_mask`) after the binary check.
        max_pixels: decompression-bomb limit; ``None`` disables it.

    Raises:
        DataError: unreadable file, a multi-channel mask with differing channels, or values
            that are not binary (the message lists the values found).
    """
    path = Path(path)
    with _open(path, max_pixels) as img:
        loaded = _load(img, path, None)
        mode = loaded.mode
        if mode == "1":
            arr = np.asarray(loaded).astype(np.uint8)
        elif mode in ("P", "LA", "PA"):
            arr = np.asarray(loaded.convert("L"))
        elif mode in ("RGB", "RGBA", "CMYK", "YCbCr"):
            rgb = np.asarray(loaded if mode in ("RGB", "RGBA") else loaded.convert("RGB"))[:, :, :3]
            if not (np.array_equal(rgb[:, :, 0], rgb[:, :, 1]) and np.array_equal(rgb[:, :, 0], rgb[:, :, 2])):
                raise DataError(path, f"mask has {mode} colour channels that differ; a mask must be single-channel")
            arr = rgb[:, :, 0]
        elif mode == "F":
            raise DataError(path, "unsupported floating-point mask (mode F)")
        else:  # L, I, I;16*
            arr = np.asarray(loaded)
    mask = _binary(np.unique(arr), path, arr)
    if size is not None:
        mask = resize_mask(mask, size)
    return np.ascontiguousarray(mask)
