"""Prediction inputs: image files, folders, the official ISIC 2018 layout, or a manifest CSV, as records."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from skinfusion.data.records import Record
from skinfusion.errors import DataError

__all__ = ["collect_records"]

_SKIPPED_SUFFIXES = ("_segmentation", "_superpixels", "_overlay")


def _image_files(folder: Path) -> list[Path]:
    from skinfusion.data.imageio import IMAGE_EXTENSIONS

    return [
        path
        for path in sorted(folder.iterdir())
        if path.is_file()
        and path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and not path.stem.endswith(_SKIPPED_SUFFIXES)
    ]


def _isic_subsets(folder: Path) -> dict[str, set[str]]:
    """``{subset: {"task1", "task3"}}`` of the official ISIC 2018 input folders inside ``folder``."""
    found: dict[str, set[str]] = {}
    for path in folder.iterdir():
        match = re.fullmatch(r"ISIC2018_Task(1-2|3)_(\w+?)_Input", path.name)
        if match and path.is_dir():
            found.setdefault(match.group(2), set()).add("task1" if match.group(1) == "1-2" else "task3")
    return found


def collect_records(
    sources: str | Path | Record | Iterable[str | Path | Record], subset: str | None = None
) -> list[Record]:
    """Turn prediction inputs into records, in a stable order.

    Each source may be

    * an image file;
    * a folder of images (not recursive; ``*_segmentation.*`` masks and hidden files are skipped);
    * a folder in the official ISIC 2018 layout (holding ``ISIC2018_Task1-2_{subset}_Input`` and/or
      ``ISIC2018_Task3_{subset}_Input``, with their ground truth when present);
    * a manifest CSV (``image,mask,label,...``; a prepared manifest's ``orig_image``/``orig_mask``
      columns are used instead of its resized cache files);
    * a :class:`Record`.

    ``subset`` chooses the ISIC subset (``"Training"``, ``"Validation"``, ``"Test"``) when a folder holds several.

    Raises:
        DataError: a missing path, an ISIC folder with several subsets and no ``subset``, or two
            inputs with the same image id (their outputs would overwrite each other).
    """
    from skinfusion.data.readers import combine, create_reader

    if isinstance(sources, (str, Path, Record)):
        sources = [sources]
    records: list[Record] = []
    for source in sources:
        if isinstance(source, Record):
            records.append(source)
            continue
        path = Path(source)
        if path.is_file() and path.suffix.lower() == ".csv":
            records.extend(create_reader("manifest", path, allow_outside_root=True, originals=True).read())
        elif path.is_file():
            records.append(Record(image=path, source="file"))
        elif path.is_dir():
            subsets = _isic_subsets(path)
            if subsets:
                if subset is None and len(subsets) > 1:
                    raise DataError(path, f"holds several ISIC subsets {sorted(subsets)}; choose one with subset=")
                name = subset if subset is not None else next(iter(subsets))
                if name not in subsets:
                    raise DataError(path, f"no ISIC subset {name!r}; found {sorted(subsets)}")
                tasks = [task for task in ("task1", "task3") if task in subsets[name]]
                records.extend(combine(*(create_reader(f"isic_{task}", path, subset=name).read() for task in tasks)))
            else:
                files = _image_files(path)
                if not files:
                    raise DataError(path, "no image files found")
                records.extend(Record(image=p, source="folder") for p in files)
        else:
            raise DataError(path, "no such file or folder")
    seen: dict[str, Path] = {}
    for record in records:
        if record.id in seen and Path(seen[record.id]) != Path(record.image):
            raise DataError(record.image, f"image id {record.id} also names {seen[record.id]}; outputs are named by id")
        seen[record.id] = Path(record.image)
    return records
