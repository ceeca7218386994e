"""Data: records and readers, validation, prepare, transforms, Dataset and LightningDataModule.

Heavy modules (torch, Lightning, albumentations) load on first use of their names, so that
``import skinfusion.data`` and the readers stay cheap (e.g. for ``skinfusion prepare``).
"""

from __future__ import annotations

import importlib
from typing import Any

from skinfusion.data.records import ISIC_CLASSES, META_KEYS, Record

_MODULES: dict[str, tuple[str, ...]] = {
    "imageio": ("read_image", "read_mask", "image_size"),
    "readers": ("create_reader", "list_readers", "register_reader", "combine", "Reader"),
    "validate": ("validate_record", "validate_records"),
    "split": ("assign_splits",),
    "prepare": ("prepare",),
    "synthetic": ("make_lesion", "write_synthetic", "synthetic_records"),
    "transforms": ("build_transforms",),
    "dataset": ("SkinLesionDataset", "encode_metadata", "withhold_metadata", "META_DIM", "SITES"),
    "datamodule": ("SkinFusionDataModule",),
}
# public name -> module that defines it
_LAZY: dict[str, str] = {name: f"skinfusion.data.{module}" for module, names in _MODULES.items() for name in names}

__all__ = ["ISIC_CLASSES", "META_KEYS", "Record", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
