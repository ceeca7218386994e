"""Data: records and readers, validation, prepare, transforms, Dataset and LightningDataModule.

Heavy modules (torch, Lightning, albumentations) load on first use of their names, so that
``import skinfusion.data`` and the readers stay cheap (e.g. for ``skinfusion prepare``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from skinfusion.data.records import ISIC_CLASSES, META_KEYS, Record

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # image I/O, readers, validation, split, prepare
    "read_image": "skinfusion.data.imageio",
    "read_mask": "skinfusion.data.imageio",
    "image_size": "skinfusion.data.imageio",
    "create_reader": "skinfusion.data.readers",
    "list_readers": "skinfusion.data.readers",
    "register_reader": "skinfusion.data.readers",
    "combine": "skinfusion.data.readers",
    "Reader": "skinfusion.data.readers",
    "validate_record": "skinfusion.data.validate",
    "validate_records": "skinfusion.data.validate",
    "assign_splits": "skinfusion.data.split",
    "prepare": "skinfusion.data.prepare",
    # synthetic data, transforms, Dataset, DataModule
    "make_lesion": "skinfusion.data.synthetic",
    "write_synthetic": "skinfusion.data.synthetic",
    "synthetic_records": "skinfusion.data.synthetic",
    "build_transforms": "skinfusion.data.transforms",
    "SkinLesionDataset": "skinfusion.data.dataset",
    "encode_metadata": "skinfusion.data.dataset",
    "META_DIM": "skinfusion.data.dataset",
    "SITES": "skinfusion.data.dataset",
    "SkinFusionDataModule": "skinfusion.data.datamodule",
}

__all__ = [
    "ISIC_CLASSES",
    "META_DIM",
    "META_KEYS",
    "Reader",
    "Record",
    "SITES",
    "SkinFusionDataModule",
    "SkinLesionDataset",
    "assign_splits",
    "build_transforms",
    "combine",
    "create_reader",
    "encode_metadata",
    "image_size",
    "list_readers",
    "make_lesion",
    "prepare",
    "read_image",
    "read_mask",
    "register_reader",
    "synthetic_records",
    "validate_record",
    "validate_records",
    "write_synthetic",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs
    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.data.dataset import META_DIM, SITES, SkinLesionDataset, encode_metadata
    from skinfusion.data.imageio import image_size, read_image, read_mask
    from skinfusion.data.prepare import prepare
    from skinfusion.data.readers import Reader, combine, create_reader, list_readers, register_reader
    from skinfusion.data.split import assign_splits
    from skinfusion.data.synthetic import make_lesion, synthetic_records, write_synthetic
    from skinfusion.data.transforms import build_transforms
    from skinfusion.data.validate import validate_record, validate_records


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
