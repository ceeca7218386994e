"""Checks that a Record's files are usable: decodable image, binary mask of the same size, known class.

:func:`validate_record` collects every problem of one record; :func:`load_record` stops at the
first one and hands back the decoded arrays, so ``prepare`` validates and caches from one decode.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skinfusion.data.imageio import DEFAULT_MAX_PIXELS, image_size, read_image, read_mask
from skinfusion.data.records import Record
from skinfusion.errors import DataError

__all__ = [
    "LoadedRecord",
    "check_inside_root",
    "check_label",
    "check_sizes",
    "check_unique_ids",
    "load_record",
    "size_mismatch",
    "validate_record",
    "validate_records",
]


@dataclass
class LoadedRecord:
    """A validated record's pixels.

    Attributes:
        image: ``uint8`` ``(H, W, 3)`` RGB, upright, downscaled when a size was requested.
        mask: ``uint8`` ``(H, W)`` in ``{0,1}`` at the image's (downscaled) size, or ``None``.
        orig_size: the original upright ``(width, height)`` of the image.
    """

    image: np.ndarray
    mask: np.ndarray | None
    orig_size: tuple[int, int]


def check_inside_root(path: str | Path, root: str | Path, *, allow_outside_root: bool = False) -> Path:
    """Resolve ``path`` (relative paths against ``root``) and check that it stays inside ``root``.

    Symbolic links are resolved, so a link pointing out of ``root`` also counts as escaping.
    Returns the resolved absolute path.

    Raises:
        DataError: the path escapes ``root`` (``..`` components, an absolute path elsewhere)
            and ``allow_outside_root`` is False.
    """
    root_resolved = Path(root).resolve()
    candidate = Path(path)
    resolved = (candidate if candidate.is_absolute() else root_resolved / candidate).resolve()
    if not allow_outside_root and not resolved.is_relative_to(root_resolved):
        raise DataError(
            path,
            f"path escapes its root {root_resolved} (resolves to {resolved}); pass allow_outside_root=True to allow",
        )
    return resolved


def check_label(record: Record, class_names: Sequence[str] | None) -> None:
    """Raise ``DataError`` (naming the image) when the record's label is not in ``class_names``."""
    if class_names is not None and record.label is not None and record.label not in class_names:
        raise DataError(record.image, f"unknown class {record.label!r}; expected one of {', '.join(class_names)}")


def size_mismatch(record: Record, mask_size: tuple[int, int], image_size: tuple[int, int]) -> DataError:
    """The error for a mask whose ``(width, height)`` differs from its image's."""
    return DataError(
        record.mask,
        f"mask is {mask_size[0]}x{mask_size[1]} but image {Path(record.image).name} is "
        f"{image_size[0]}x{image_size[1]} (after EXIF orientation)",
    )


def check_sizes(record: Record, *, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Return the image's upright ``(width, height)`` from the headers, checking that the mask has it too.

    Raises:
        DataError: an unreadable header or a mask of another size.
    """
    size = image_size(record.image, max_pixels=max_pixels)
    if record.mask is not None:
        mask_size = image_size(record.mask, max_pixels=max_pixels)
        if mask_size != size:
            raise size_mismatch(record, mask_size, size)
    return size


def load_record(
    record: Record,
    class_names: Sequence[str] | None = None,
    *,
    max_side: int | None = None,
    side: str = "longest",
    reduce: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> LoadedRecord:
    """Validate one record and return its decoded pixels; stops at the first problem.

    Args:
        class_names: allowed labels (``None``: any).
        max_side: downscale so that the ``side`` side (``"longest"`` or ``"shortest"``) is at most
            this (see :func:`read_image`); the mask is resized to the same size.
        reduce: allow reduced-resolution JPEG decoding.
        max_pixels: decompression-bomb limit.

    Raises:
        DataError: the first problem found (file, reason).
    """
    check_label(record, class_names)
    orig_size = check_sizes(record, max_pixels=max_pixels)
    image = read_image(record.image, max_side, side=side, reduce=reduce, max_pixels=max_pixels)
    mask = None
    if record.mask is not None:
        h, w = image.shape[:2]
        mask = read_mask(record.mask, size=(w, h), max_pixels=max_pixels)
    return LoadedRecord(image=image, mask=mask, orig_size=orig_size)


def validate_record(
    record: Record, class_names: Sequence[str] | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list[DataError]:
    """Check one record completely and return every problem found (empty list: valid).

    Checks: the label is a known class; the image decodes fully (missing, empty, truncated,
    corrupt, too large files fail); the mask decodes, is single-channel and binary; and the
    mask has the image's size after EXIF orientation.
    """
    problems: list[DataError] = []
    try:
        check_label(record, class_names)
    except DataError as err:
        problems.append(err)
    image_shape = None
    try:
        image_shape = read_image(record.image, max_pixels=max_pixels).shape
    except DataError as err:
        problems.append(err)
    if record.mask is not None:
        try:
            mask = read_mask(record.mask, max_pixels=max_pixels)
            if image_shape is not None and mask.shape != image_shape[:2]:
                problems.append(size_mismatch(record, mask.shape[::-1], image_shape[1::-1]))
        except DataError as err:
            problems.append(err)
    return problems


def check_unique_ids(records: Iterable[Record]) -> None:
    """Raise ``DataError`` listing every image id that more than one record uses."""
    seen: dict[str, Record] = {}
    duplicates: list[str] = []
    for record in records:
        first = seen.setdefault(record.id, record)
        if first is not record:
            duplicates.append(f"{record.id}: {first.image} ({first.source}) and {record.image} ({record.source})")
    if duplicates:
        raise DataError(None, f"duplicate image id in {len(duplicates)} record(s):\n  " + "\n  ".join(duplicates))


def validate_records(
    records: Sequence[Record], class_names: Sequence[str] | None = None, *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> list[DataError]:
    """Validate a list of records sequentially (duplicate ids first), returning every problem."""
    problems: list[DataError] = []
    try:
        check_unique_ids(records)
    except DataError as err:
        problems.append(err)
    for record in records:
        problems.extend(validate_record(record, class_names, max_pixels=max_pixels))
    return problems


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when two paths are the same file, or two files with identical bytes."""
    a, b = Path(a), Path(b)
    try:
        if os.path.samefile(a, b):
            return True
        if a.stat().st_size != b.stat().st_size:
            return False
        return a.read_bytes() == b.read_bytes()
    except OSError:
        return False
