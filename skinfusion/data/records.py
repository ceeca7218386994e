"""The Record: one image with whatever annotation its source has, whichever reader found it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ISIC 2018 Task 3 diagnosis classes, in the order of the official ground-truth CSV.
ISIC_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")

#: Metadata keys a Record may carry (HAM10000 names them age, sex, localization).
META_KEYS: tuple[str, ...] = ("age", "sex", "site")

#: Columns of the prepared manifest that ``skinfusion prepare`` and the synthetic writer produce and
#: the DataModule reads; ``image``/``mask`` are relative to the manifest, ``orig_*`` describe the originals.
MANIFEST_COLUMNS: tuple[str, ...] = (
    "id",
    "image",
    "mask",
    "label",
    "lesion_id",
    "split",
    "source",
    "age",
    "sex",
    "site",
    "orig_image",
    "orig_mask",
    "orig_width",
    "orig_height",
)


@dataclass(frozen=True)
class Record:
    """One image and its annotations.

    Attributes:
        image: path of the image file.
        mask: path of the binary lesion mask ({0,255}, same size as the image), or ``None``.
        label: diagnosis class name (e.g. ``"MEL"``), or ``None`` when unknown.
        lesion_id: identifier of the physical lesion (HAM10000 ``lesion_id``); images of one
            lesion always land in the same split. ``None``: the image is its own group.
        meta: optional clinical metadata: ``age`` (float years), ``sex`` (``"male"``/``"female"``),
            ``site`` (anatomical site string). Missing keys mean unknown.
        source: name of the reader / dataset the record came from (for reports).
    """

    image: Path
    mask: Path | None = None
    label: str | None = None
    lesion_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def id(self) -> str:
        """Image id: the file name without extension (``ISIC_0012345``)."""
        return Path(self.image).stem

    @property
    def group(self) -> str:
        """Split group: the lesion id, or the image id for an image without one."""
        return self.lesion_id or f"image:{self.id}"
