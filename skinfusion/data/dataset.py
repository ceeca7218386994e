"""The map-style Dataset: one Record in, one sample of the Batch contract out."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from skinfusion.data.imageio import read_image, read_mask
from skinfusion.data.records import Record
from skinfusion.data.validate import size_mismatch
from skinfusion.errors import DataError

#: Anatomical sites of HAM10000's ``localization`` column (``unknown`` is the extra slot).
SITES: tuple[str, ...] = (
    "abdomen",
    "acral",
    "back",
    "chest",
    "ear",
    "face",
    "foot",
    "genital",
    "hand",
    "lower extremity",
    "neck",
    "scalp",
    "trunk",
    "upper extremity",
)
#: Other spellings (ISIC 2019/2020 ``anatom_site_general``) mapped onto :data:`SITES`.
SITE_ALIASES: dict[str, str] = {
    "anterior torso": "chest",
    "posterior torso": "back",
    "lateral torso": "trunk",
    "torso": "trunk",
    "palms/soles": "acral",
    "oral/genital": "genital",
    "lower limb": "lower extremity",
    "upper limb": "upper extremity",
}
SEXES: tuple[str, ...] = ("male", "female")

#: Length of the encoded metadata: age/100 and its missing flag, sex one-hot + unknown, site one-hot + unknown.
META_DIM: int = 2 + len(SEXES) + 1 + len(SITES) + 1


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "unknown", "nan", "none")


def read_metadata(meta: Mapping[str, Any]) -> dict[str, Any]:
    """The clinical fields of ``meta`` as :func:`encode_metadata` reads them: ``{"age": years, "sex", "site"}``, each
    normalised (lower case, :data:`SITE_ALIASES` applied) or ``None`` where it is missing or not recognised."""
    age = meta.get("age")
    try:
        age = None if _is_missing(age) else float(age)
    except (TypeError, ValueError):
        age = None
    if age is not None and math.isnan(age):
        age = None
    sex = meta.get("sex")
    sex = "" if _is_missing(sex) else str(sex).strip().lower()
    site = meta.get("site")
    site = "" if _is_missing(site) else str(site).strip().lower().replace("_", " ")
    site = SITE_ALIASES.get(site, site)
    return {"age": age, "sex": sex if sex in SEXES else None, "site": site if site in SITES else None}


def encode_metadata(meta: Mapping[str, Any]) -> np.ndarray:
    """Encode ``meta`` (optional ``age`` in years, ``sex``, ``site``) as a float32 vector of length :data:`META_DIM`.

    Layout: ``[age / 100, age missing, male, female, sex unknown, *sites, site unknown]``; a
    missing age is encoded as 0 with the flag set. Sites are matched case-insensitively, with
    underscores as spaces and :data:`SITE_ALIASES` applied; any other site counts as unknown
    (:func:`read_metadata` gives the values read).
    """
    vector = np.zeros(META_DIM, np.float32)
    fields = read_metadata(meta)
    if fields["age"] is None:
        vector[1] = 1.0
    else:
        vector[0] = fields["age"] / 100.0
    sex, site = fields["sex"], fields["site"]
    vector[2 + (SEXES.index(sex) if sex is not None else len(SEXES))] = 1.0
    offset = 2 + len(SEXES) + 1
    vector[offset + (SITES.index(site) if site is not None else len(SITES))] = 1.0
    return vector


#: The fields of :func:`encode_metadata`, in the order :func:`withhold_metadata` draws them.
META_FIELDS: tuple[str, ...] = ("age", "sex", "site")


def withhold_metadata(
    meta: Mapping[str, Any], rng: np.random.Generator, all_fields: float = 0.0, per_field: float = 0.0
) -> dict[str, Any]:
    """``meta`` with fields withheld at random (modality dropout), as a training augmentation.

    With probability ``all_fields`` every field of :data:`META_FIELDS` is withheld; otherwise each is withheld
    with probability ``per_field``. A withheld field reads as missing, exactly as in an image that never had it,
    so "metadata unknown" is seen for every class and stops marking the data sets that lack it.
    """
    if rng.random() < all_fields:
        dropped = set(META_FIELDS)
    else:
        dropped = {name for name in META_FIELDS if rng.random() < per_field}
    return {k: v for k, v in meta.items() if k not in dropped}


def unknown_metadata(like: torch.Tensor) -> torch.Tensor:
    """Encoded metadata with every field withheld, shaped, typed and placed like ``like`` (B, META_DIM)."""
    return torch.as_tensor(encode_metadata({}), dtype=like.dtype, device=like.device).expand_as(like)


class SkinLesionDataset(Dataset):
    """Images with optional masks and labels, transformed into samples of the Batch contract.

    Each sample is a dict: ``image`` float32 (3,H,W), ``mask`` float32 (1,H,W) in {0,1} (zeros
    when the image has no mask), ``has_mask`` bool, ``label`` int64 class index or -1, ``id`` str,
    and ``meta`` float32 (META_DIM,) when ``use_metadata``. ``torch.utils.data.default_collate``
    turns a list of them into a Batch (``id`` becomes a list of str).

    Args:
        records: the images, with paths that resolve from the working directory (make them absolute first).
        transform: callable ``transform(image=HxWx3 uint8, mask=HxW uint8)`` returning a dict with
            tensors ``image`` (3,H,W) and ``mask`` (1,H,W), e.g. :func:`build_transforms`'s result.
        use_metadata: add the encoded metadata (:func:`encode_metadata`) under ``meta``.
        max_side: read images downscaled so their longest side is at most this (masks follow,
            staying binary); ``None`` reads them at full size.
        metadata_dropout: probability that a sample's metadata is withheld whole (:func:`withhold_metadata`);
            for training only.
        metadata_field_dropout: probability that each field (age, sex, site) is withheld otherwise.

    Raises:
        DataError: (at construction) a label not in ``class_names``; (when reading) an unreadable
            file or a mask whose size does not match its image.
    """

    def __init__(
        self,
        records: Sequence[Record],
        class_names: Sequence[str],
        transform: Callable[..., dict[str, Any]] | None = None,
        use_metadata: bool = False,
        max_side: int | None = None,
        metadata_dropout: float = 0.0,
        metadata_field_dropout: float = 0.0,
    ) -> None:
        for name, value in (("metadata_dropout", metadata_dropout), ("metadata_field_dropout", metadata_field_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        self.records = list(records)
        self.class_names = tuple(class_names)
        self.class_to_index = {name: i for i, name in enumerate(self.class_names)}
        for record in self.records:
            if record.label is not None and record.label not in self.class_to_index:
                raise DataError(
                    record.image, f"unknown label {record.label!r}; expected one of {list(self.class_names)}"
                )
        self.transform = transform
        self.use_metadata = use_metadata
        self.max_side = max_side
        self.metadata_dropout = metadata_dropout
        self.metadata_field_dropout = metadata_field_dropout
        self._rng = np.random.default_rng(0)

    def set_random_seed(self, seed: int) -> None:
        """Seed the metadata withholding (``EpochSeededDataset`` does it per sample, as for the transform)."""
        self._rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labels(self) -> list[int]:
        """Class index of every sample (-1 where unlabelled), without reading any file."""
        return [-1 if r.label is None else self.class_to_index[r.label] for r in self.records]

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Read sample ``index`` untransformed: image uint8 (H,W,3) RGB and mask uint8 (H,W) in {0,1} or None."""
        record = self.records[index]
        image = read_image(record.image, self.max_side)
        if record.mask is None:
            return image, None
        height, width = image.shape[:2]
        # Downscaled images take their mask to the same size; full-size ones must match exactly.
        mask = read_mask(record.mask, size=(width, height)) if self.max_side else read_mask(record.mask)
        if mask.shape != (height, width):
            raise size_mismatch(record, mask.shape[::-1], (width, height))
        return image, mask

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self.records[index]
        image, mask = self.load(index)
        has_mask = mask is not None
        if mask is None:
            mask = np.zeros(image.shape[:2], np.uint8)
        if self.transform is None:
            image_t = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div_(255.0)
            mask_t = torch.from_numpy(mask).float()[None]
        else:
            out = self.transform(image=image, mask=mask)
            image_t, mask_t = out["image"], out["mask"]
        sample: dict[str, Any] = {
            "image": image_t,
            "mask": mask_t,
            "has_mask": torch.tensor(has_mask),
            "label": torch.tensor(-1 if record.label is None else self.class_to_index[record.label], dtype=torch.int64),
            "id": record.id,
        }
        if self.use_metadata:
            meta = record.meta
            if self.metadata_dropout or self.metadata_field_dropout:
                meta = withhold_metadata(meta, self._rng, self.metadata_dropout, self.metadata_field_dropout)
            sample["meta"] = torch.from_numpy(encode_metadata(meta))
        return sample
