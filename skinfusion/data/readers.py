"""Readers: turn a dataset's on-disk layout into :class:`~skinfusion.data.records.Record` lists.

Readers are plugged in by name (``create_reader("isic_task1", root)``, ``list_readers()``): ``isic_task1``,
``isic_task3`` (+ HAM10000 metadata and masks), ``diagnosis_csv`` (labels for another source's images),
``ph2``, ``manifest`` (generic CSV, paths relative to it) and ``synthetic``. None of them decodes an image
(that is :mod:`skinfusion.data.validate`'s job). Several sources are joined with :func:`combine`
(records of one image id merge; conflicting files or labels raise ``DataError``) and
:func:`apply_labels` (a label table onto records).
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from skinfusion.data.imageio import IMAGE_EXTENSIONS
from skinfusion.data.records import ISIC_CLASSES, Record
from skinfusion.data.validate import check_inside_root, same_file
from skinfusion.errors import DataError
from skinfusion.registry import Registry

__all__ = [
    "DiagnosisCSVReader",
    "ISICTask1Reader",
    "ISICTask3Reader",
    "ManifestReader",
    "PH2Reader",
    "Reader",
    "SyntheticReader",
    "apply_label_map",
    "apply_labels",
    "combine",
    "create_reader",
    "list_readers",
    "read_csv_rows",
    "register_reader",
]

_READERS: Registry[Reader] = Registry("reader")

#: HAM10000 ``dx`` codes to ISIC 2018 Task 3 class names.
HAM_DX: dict[str, str] = {c.lower(): c for c in ISIC_CLASSES}
#: PH² ``Clinical Diagnosis`` codes: 0 common nevus, 1 atypical nevus, 2 melanoma.
PH2_DIAGNOSIS: dict[str, str] = {"0": "NV", "1": "NV", "2": "MEL"}
_UNKNOWN = {"", "unknown", "nan", "none", "na", "n/a"}


def register_reader(name: str) -> Callable[[type[Reader]], type[Reader]]:
    """Class decorator registering a reader under ``name`` (also its ``Reader.name``)."""

    def deco(cls: type[Reader]) -> type[Reader]:
        cls.name = name
        return _READERS.register(name)(cls)

    return deco


#: Names of the registered readers, sorted.
list_readers = _READERS.names


def create_reader(kind: str, path: str | Path, **kwargs: Any) -> Reader:
    """Build the reader registered as ``kind`` for the dataset at ``path``.

    Raises:
        ValueError: unknown ``kind`` (the message lists the choices) or bad keyword arguments.
    """
    cls = _READERS.get(kind)
    try:
        return cls(path, **kwargs)
    except TypeError as err:
        raise ValueError(f"bad arguments for reader {kind!r}: {err}") from None


def apply_label_map(label: str | None, label_map: Mapping[str, str] | None) -> str | None:
    """Map ``label`` through ``label_map`` (labels not in the map are kept)."""
    if label is None or not label_map:
        return label
    return label_map.get(label, label)


def read_csv_rows(path: str | Path, required: Sequence[str] = ()) -> list[tuple[int, dict[str, str]]]:
    """Read a CSV into ``(line_number, row)`` pairs (stripped values), checking the ``required`` columns.

    Raises:
        DataError: missing, empty or malformed file, or missing columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "file not found")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise DataError(path, "empty CSV (no header)")
            fields = [c.strip() for c in reader.fieldnames]
            missing = [c for c in required if c not in fields]
            if missing:
                raise DataError(path, f"missing column(s) {', '.join(missing)}; found {', '.join(fields)}")
            reader.fieldnames = fields
            return [
                (i + 2, {k: (v or "").strip() for k, v in row.items() if k is not None}) for i, row in enumerate(reader)
            ]
    except UnicodeDecodeError as err:
        raise DataError(path, f"not a UTF-8 text CSV ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise DataError(path, f"malformed CSV: {err}") from None


def _meta(path: Path, line: int, row: Mapping[str, str], site_columns: Sequence[str]) -> dict[str, Any]:
    """Clinical metadata of a CSV row (unknown values left out); the site is read from the first column present."""
    meta: dict[str, Any] = {}
    age = row.get("age") or ""
    sex = (row.get("sex") or "").strip().lower()
    site = next((row[c] for c in site_columns if c in row), None) or ""
    if age.strip().lower() not in _UNKNOWN:
        try:
            value = float(age)
        except ValueError:
            raise DataError(path, f"line {line}: bad age {age!r}") from None
        if not math.isnan(value):
            meta["age"] = value
    if sex in ("male", "female"):
        meta["sex"] = sex
    if site.strip().lower() not in _UNKNOWN:
        meta["site"] = site.strip()
    return meta


def _named(folder: Path, stem: str) -> list[Path]:
    """Image files of ``folder`` named ``stem`` (any image extension)."""
    return [p for p in folder.iterdir() if p.stem == stem and p.suffix.lower() in IMAGE_EXTENSIONS]


def _image_files(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` by stem; other files (LICENSE, ATTRIBUTION.txt, ...) are ignored."""
    files: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."):
            if p.stem in files:
                raise DataError(p, f"duplicate image id {p.stem!r} in {folder} (also {files[p.stem].name})")
            files[p.stem] = p
    return files


class Reader:
    """Base class: a reader is built with the dataset path and options, and ``read()`` returns records.

    Every reader takes ``label_map``, an optional mapping applied to every label (e.g. ``{"MEL": "SCC"}``).
    """

    name: str = ""
    #: False for readers that only annotate images found by other readers (``diagnosis_csv``).
    provides_images: bool = True

    def __init__(self, path: str | Path, label_map: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        self.label_map = dict(label_map) if label_map else None

    def read(self) -> list[Record]:
        raise NotImplementedError

    def __iter__(self):
        return iter(self.read())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


@register_reader("isic_task1")
class ISICTask1Reader(Reader):
    """ISIC 2018 Task 1 folders ``ISIC2018_Task1-2_{subset}_Input`` and ``ISIC2018_Task1_{subset}_GroundTruth``.

    ``subset`` is ``"Training"``, ``"Validation"`` or ``"Test"``. A missing ground-truth folder gives
    records without masks (the Test subset); with the folder present, an image without its
    ``ISIC_x_segmentation.png`` still gets that path, so validation reports the missing file.
    """

    def __init__(self, path: str | Path, subset: str = "Training", label_map: Mapping[str, str] | None = None) -> None:
        super().__init__(path, label_map)
        self.subset = subset

    def read(self) -> list[Record]:
        images_dir = self.path / f"ISIC2018_Task1-2_{self.subset}_Input"
        masks_dir = self.path / f"ISIC2018_Task1_{self.subset}_GroundTruth"
        if not images_dir.is_dir():
            raise DataError(images_dir, "ISIC 2018 Task 1 image folder not found")
        has_masks = masks_dir.is_dir()
        return [
            Record(image=p, mask=masks_dir / f"{stem}_segmentation.png" if has_masks else None, source=self.name)
            for stem, p in _image_files(images_dir).items()
        ]


@register_reader("isic_task3")
class ISICTask3Reader(Reader):
    """ISIC 2018 Task 3 / HAM10000: one-hot ground-truth CSV, images, optional metadata and masks.

    Args:
        path: root folder of the official layout.
        subset: ``"Training"``, ``"Validation"`` or ``"Test"`` (names the default CSV and folder).
        csv: ground-truth CSV ``image,MEL,NV,...`` (default ``ISIC2018_Task3_{subset}_GroundTruth.csv``);
            every column but ``image`` is a class. A missing default CSV gives unlabelled records.
        images: image folder (default ``ISIC2018_Task3_{subset}_Input``).
        metadata: ``HAM10000_metadata.csv`` (``lesion_id,image_id,dx,...,age,sex,localization``);
            ``"auto"`` uses it when present in ``path``, ``None`` ignores it. Its ``dx`` must agree
            with the CSV's label.
        masks: folder of ``ISIC_x_segmentation.png``; ``"auto"`` uses
            ``HAM10000_segmentations_lesion_tschandl`` when present. Images without a mask file there
            get no mask (the masks are a supplementary source).

    Raises:
        DataError: a CSV row whose one-hot vector does not hold exactly one 1, a metadata ``dx`` that
            contradicts the CSV, or missing folders.
    """

    def __init__(
        self,
        path: str | Path,
        subset: str = "Training",
        csv: str | Path | None = None,
        images: str | Path | None = None,
        metadata: str | Path | None = "auto",
        masks: str | Path | None = "auto",
        label_map: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(path, label_map)
        self.subset = subset
        self.csv = Path(csv) if csv else self.path / f"ISIC2018_Task3_{subset}_GroundTruth.csv"
        self.csv_given = csv is not None
        self.images = Path(images) if images else self.path / f"ISIC2018_Task3_{subset}_Input"
        self.metadata = self.path / "HAM10000_metadata.csv" if metadata == "auto" else metadata
        self.masks = self.path / "HAM10000_segmentations_lesion_tschandl" if masks == "auto" else masks
        if metadata == "auto" and not self.metadata.is_file():
            self.metadata = None
        if masks == "auto" and not self.masks.is_dir():
            self.masks = None

    def _labels(self) -> dict[str, str]:
        if not self.csv.is_file() and not self.csv_given:
            return {}
        rows = read_csv_rows(self.csv, required=["image"])
        labels: dict[str, str] = {}
        for line, row in rows:
            classes = [k for k in row if k != "image"]
            try:
                values = [float(row[c]) for c in classes]
            except ValueError:
                raise DataError(self.csv, f"line {line} ({row['image']}): non-numeric one-hot value") from None
            ones = [c for c, v in zip(classes, values, strict=True) if v == 1.0]
            if len(ones) != 1 or any(v not in (0.0, 1.0) for v in values):
                raise DataError(
                    self.csv,
                    f"line {line} ({row['image']}): one-hot vector must hold exactly one 1 and zeros elsewhere, "
                    f"got {dict(zip(classes, values, strict=True))}",
                )
            if row["image"] in labels:
                raise DataError(self.csv, f"line {line}: image {row['image']} listed twice")
            labels[row["image"]] = ones[0]
        return labels

    def read(self) -> list[Record]:
        if not self.images.is_dir():
            raise DataError(self.images, "ISIC 2018 Task 3 image folder not found")
        files = _image_files(self.images)
        labels = self._labels()
        meta: dict[str, tuple[str | None, dict[str, Any]]] = {}
        if self.metadata is not None:
            for line, row in read_csv_rows(self.metadata, required=["lesion_id", "image_id"]):
                image_id = row["image_id"]
                dx = row.get("dx", "")
                if image_id in labels and dx and HAM_DX.get(dx.lower(), dx) != labels[image_id]:
                    raise DataError(
                        self.metadata,
                        f"line {line}: dx {dx!r} of {image_id} contradicts {labels[image_id]} in {self.csv.name}",
                    )
                meta[image_id] = (row["lesion_id"] or None, _meta(self.metadata, line, row, ("localization", "site")))
        ids = list(labels) if labels else list(files)
        records = []
        for image_id in ids:
            image = files.get(image_id, self.images / f"{image_id}.jpg")  # missing: reported by validation
            mask = Path(self.masks) / f"{image_id}_segmentation.png" if self.masks is not None else None
            lesion_id, extra = meta.get(image_id, (None, {}))
            records.append(
                Record(
                    image=image,
                    mask=mask if mask is not None and mask.is_file() else None,
                    label=apply_label_map(labels.get(image_id), self.label_map),
                    lesion_id=lesion_id,
                    meta=extra,
                    source=self.name,
                )
            )
        return records


@register_reader("diagnosis_csv")
class DiagnosisCSVReader(Reader):
    """A ``image,label`` CSV (extra columns ignored) labelling the images of another source.

    Without ``images`` it provides labels only: :meth:`read_labels`, applied to the other sources'
    records by :func:`apply_labels` (``prepare`` does this). With ``images`` it reads records for
    ``images/<image>.<ext>`` directly.

    Args:
        path: the CSV file (e.g. ``ISIC2018_Task1_Training_Diagnosis.csv``).
        images: optional image folder to produce full records.
        image_column: column holding the image id (a file name's extension is dropped).
        label_column: column holding the class name.
    """

    def __init__(
        self,
        path: str | Path,
        images: str | Path | None = None,
        image_column: str = "image",
        label_column: str = "label",
        label_map: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(path, label_map)
        self.images = Path(images) if images else None
        self.provides_images = self.images is not None
        self.image_column = image_column
        self.label_column = label_column

    def read_labels(self) -> dict[str, str]:
        """Return ``{image_id: label}``; rows with an empty label are skipped.

        Raises:
            DataError: missing columns, or an image listed twice with different labels.
        """
        labels: dict[str, str] = {}
        for line, row in read_csv_rows(self.path, required=[self.image_column, self.label_column]):
            image_id = Path(row[self.image_column]).stem
            label = apply_label_map(row[self.label_column] or None, self.label_map)
            if label is None:
                continue
            if labels.setdefault(image_id, label) != label:
                raise DataError(self.path, f"line {line}: {image_id} labelled both {labels[image_id]} and {label}")
        return labels

    def read(self) -> list[Record]:
        if self.images is None:
            raise ValueError("diagnosis_csv provides labels only; pass images=FOLDER to read records")
        files = _image_files(self.images)
        return [
            Record(image=files.get(i, self.images / f"{i}.jpg"), label=label, source=self.name)
            for i, label in self.read_labels().items()
        ]


@register_reader("ph2")
class PH2Reader(Reader):
    """The PH² dataset layout (Mendonça et al., EMBC 2013).

    Args:
        path: folder containing the ``IMDxxx`` folders, at any depth (e.g. the ``PH2Dataset`` folder
            whose ``PH2 Dataset images/`` holds them).
        diagnosis: diagnosis table CSV with an image column (``Image Name`` or ``Name``) and
            ``Clinical Diagnosis`` (0 common nevus → NV, 1 atypical nevus → NV, 2 melanoma → MEL).
            ``"auto"`` looks for ``PH2_dataset.csv`` in ``path`` and its parent; ``None``: no labels.
            Rows whose name is not ``IMD`` + digits (the legend at the end of the official table)
            are ignored. The official ``.xlsx`` must be saved as CSV first.
    """

    _NAME = re.compile(r"^IMD\d+$")

    def __init__(
        self, path: str | Path, diagnosis: str | Path | None = "auto", label_map: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(path, label_map)
        if diagnosis == "auto":
            found = [p for p in (self.path / "PH2_dataset.csv", self.path.parent / "PH2_dataset.csv") if p.is_file()]
            diagnosis = found[0] if found else None
        self.diagnosis = Path(diagnosis) if diagnosis else None

    def read_labels(self) -> dict[str, str]:
        if self.diagnosis is None:
            return {}
        rows = read_csv_rows(self.diagnosis)
        if not rows:
            return {}
        columns = set(rows[0][1])
        name_col = next((c for c in ("Image Name", "Name", "image") if c in columns), None)
        if name_col is None or "Clinical Diagnosis" not in columns:
            raise DataError(self.diagnosis, "needs columns 'Image Name' (or 'Name') and 'Clinical Diagnosis'")
        labels = {}
        for line, row in rows:
            name = row[name_col]
            if not self._NAME.match(name):
                continue
            code = row["Clinical Diagnosis"].split(".")[0]
            if code not in PH2_DIAGNOSIS:
                raise DataError(self.diagnosis, f"line {line} ({name}): unknown Clinical Diagnosis {code!r}")
            labels[name] = apply_label_map(PH2_DIAGNOSIS[code], self.label_map)
        return labels

    def read(self) -> list[Record]:
        if not self.path.is_dir():
            raise DataError(self.path, "PH2 folder not found")
        labels = self.read_labels()
        records = []
        for folder in sorted(self.path.rglob("*_Dermoscopic_Image")):
            name = folder.name.removesuffix("_Dermoscopic_Image")
            images = _named(folder, name)
            if not images:
                raise DataError(folder, f"no image {name}.bmp in PH2 folder")
            lesion_dir = folder.parent / f"{name}_lesion"
            masks = _named(lesion_dir, f"{name}_lesion") if lesion_dir.is_dir() else []
            records.append(
                Record(image=images[0], mask=masks[0] if masks else None, label=labels.get(name), source=self.name)
            )
        if not records:
            raise DataError(self.path, "no IMDxxx/IMDxxx_Dermoscopic_Image folders found")
        return records


@register_reader("manifest")
class ManifestReader(Reader):
    """A generic manifest CSV (also the format ``prepare`` and the synthetic data set write).

    Columns: ``image`` (required), ``mask``, ``label``, ``lesion_id``, ``age``, ``sex``, ``site``
    (or ``localization``), ``split``; other columns are ignored. Paths are relative to the CSV's
    folder; empty cells mean unknown. A ``split`` value is kept in ``record.meta["split"]``.

    Args:
        allow_outside_root: allow image/mask paths that resolve outside the CSV's folder.
        source_column: column whose value becomes ``record.source`` (default: ``"manifest"``).
        originals: where a prepared manifest names the original files (``orig_image``, ``orig_mask``), read
            those instead of its resized cache (for scoring at the original resolution).

    Raises:
        DataError: a path escaping the CSV's folder, a bad ``split`` or ``age`` value, or missing columns.
    """

    def __init__(
        self,
        path: str | Path,
        allow_outside_root: bool = False,
        source_column: str | None = None,
        originals: bool = False,
        label_map: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(path, label_map)
        self.allow_outside_root = allow_outside_root
        self.source_column = source_column
        self.originals = originals

    def read(self) -> list[Record]:
        return self.records(read_csv_rows(self.path, required=["image"]))

    def records(self, rows: Iterable[tuple[int, Mapping[str, str]]]) -> list[Record]:
        """Records of the ``(line number, row)`` pairs :func:`read_csv_rows` returns (paths relative to ``path``)."""
        root = self.path.parent
        records = []
        for line, row in rows:

            def resolve(value: str, line: int = line) -> Path:
                try:
                    return check_inside_root(value, root, allow_outside_root=self.allow_outside_root)
                except DataError as err:
                    raise DataError(self.path, f"line {line}: {value!r}: {err.reason}") from None
                except (ValueError, OSError) as err:  # e.g. a NUL byte in the path
                    raise DataError(self.path, f"line {line}: {value!r}: invalid path ({err})") from None

            image, mask = row["image"], row.get("mask")
            if self.originals and row.get("orig_image"):
                image, mask = row["orig_image"], row.get("orig_mask")
            if not image:
                raise DataError(self.path, f"line {line}: empty image path")
            meta = _meta(self.path, line, row, ("site", "localization"))
            split = row.get("split", "")
            if split:
                if split not in ("train", "val", "test"):
                    raise DataError(self.path, f"line {line}: split must be train/val/test, got {split!r}")
                meta["split"] = split
            records.append(
                Record(
                    image=resolve(image),
                    mask=resolve(mask) if mask else None,
                    label=apply_label_map(row.get("label") or None, self.label_map),
                    lesion_id=row.get("lesion_id") or None,
                    meta=meta,
                    source=(row.get(self.source_column) if self.source_column else None) or self.name,
                )
            )
        return records


@register_reader("synthetic")
class SyntheticReader(Reader):
    """``n`` synthetic lesions of ``size`` pixels, written to ``path`` by :func:`.synthetic.write_synthetic`."""

    def __init__(
        self, path: str | Path, n: int = 16, seed: int = 0, size: int = 64, label_map: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(path, label_map)
        self.n, self.seed, self.size = int(n), int(seed), int(size)

    def read(self) -> list[Record]:
        from skinfusion.data.synthetic import write_synthetic  # lazy: synthetic imports this module

        records = write_synthetic(self.path, self.n, self.seed, self.size)
        return [
            replace(r, label=apply_label_map(r.label, self.label_map), source=r.source or self.name) for r in records
        ]


def _merge(a: Record, b: Record) -> Record:
    """Merge two records of one image id, or raise ``DataError`` when they conflict."""
    if Path(a.image) != Path(b.image) and not same_file(a.image, b.image):
        raise DataError(
            b.image, f"duplicate image id {a.id}: different files {a.image} ({a.source}) and {b.image} ({b.source})"
        )
    if a.mask and b.mask and Path(a.mask) != Path(b.mask) and not same_file(a.mask, b.mask):
        raise DataError(b.mask, f"image {a.id} has two different masks: {a.mask} ({a.source}) and {b.mask}")
    if a.label and b.label and a.label != b.label:
        raise DataError(b.image, f"image {a.id} labelled {a.label} by {a.source} but {b.label} by {b.source}")
    if a.lesion_id and b.lesion_id and a.lesion_id != b.lesion_id:
        raise DataError(b.image, f"image {a.id} in lesion {a.lesion_id} ({a.source}) and {b.lesion_id} ({b.source})")
    sources = a.source if b.source in a.source.split("+") else f"{a.source}+{b.source}"
    return Record(
        image=a.image,
        mask=a.mask or b.mask,
        label=a.label or b.label,
        lesion_id=a.lesion_id or b.lesion_id,
        meta={**b.meta, **a.meta},
        source=sources,
    )


def combine(*record_lists: Iterable[Record]) -> list[Record]:
    """Merge record lists by image id, keeping first-seen order.

    Two records of one id (e.g. a Task 1 image with its mask, and the same image labelled by another
    source) become one record that carries the mask, label, lesion id and metadata of both.

    Raises:
        DataError: the same id on two different image files (compared by content), masks, labels or
            lesion ids, naming the id, both files and both sources.
    """
    merged: dict[str, Record] = {}
    for records in record_lists:
        for record in records:
            rid = record.id
            merged[rid] = _merge(merged[rid], record) if rid in merged else record
    return list(merged.values())


def apply_labels(records: Iterable[Record], labels: Mapping[str, str], source: str = "") -> tuple[list[Record], int]:
    """Give records the label ``labels[record.id]``; return the new records and how many labels were used.

    Raises:
        DataError: a record already carries a different label.
    """
    out, used = [], 0
    for record in records:
        label = labels.get(record.id)
        if label is None:
            out.append(record)
            continue
        used += 1
        if record.label is not None and record.label != label:
            raise DataError(record.image, f"labelled {record.label} by {record.source} but {label} by {source}")
        tag = record.source if not source or source in record.source.split("+") else f"{record.source}+{source}"
        out.append(replace(record, label=label, source=tag))
    return out, used
