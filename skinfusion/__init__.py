"""skinfusion: joint lesion segmentation and diagnosis for dermoscopic images.

The main classes are importable from here (loaded on first use, so ``import skinfusion`` stays cheap)::

    from skinfusion import SkinFusionNet, SkinFusionModule, SkinFusionDataModule, Predictor
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SkinFusionNet": "skinfusion.nn",
    "SkinFusionOutput": "skinfusion.nn.output",
    "SkinFusionModule": "skinfusion.module",
    "SkinFusionDataModule": "skinfusion.data.datamodule",
    "MultiTaskLoss": "skinfusion.losses",
    "Predictor": "skinfusion.predict",
    "render_overlay": "skinfusion.predict",
    "write_mask": "skinfusion.predict",
    "PostProcess": "skinfusion.postprocess",
    "Record": "skinfusion.data.records",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'skinfusion' has no attribute {name!r}")
