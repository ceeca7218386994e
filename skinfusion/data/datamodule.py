"""The LightningDataModule: a manifest (or generated synthetic data) in, Batches out."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, get_worker_info

from skinfusion.data.dataset import META_DIM, SkinLesionDataset
from skinfusion.data.readers import apply_label_map, create_reader
from skinfusion.data.records import ISIC_CLASSES, Record
from skinfusion.data.sampling import (
    EpochSeededDataset,
    ResumableSampler,
    UnpaddedDistributedSampler,
    batches_per_epoch,
    distributed_world,
    mixed_seed,
    resume_position,
)
from skinfusion.data.split import SPLITS, assign_folds, assign_splits, normalized_fractions
from skinfusion.data.synthetic import SYNTHETIC_VERSION, synthetic_records, write_synthetic
from skinfusion.data.transforms import build_transforms, normalize_tensor
from skinfusion.data.validate import check_sizes, check_unique_ids, validate_records
from skinfusion.errors import DataError

__all__ = ["SkinFusionDataModule", "seed_worker"]

log = logging.getLogger(__name__)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed numpy, ``random`` and the dataset's albumentations pipeline.

    The seed mixes the worker's torch seed (the loader's base seed, drawn from its generator, plus
    the worker id) with the process rank, so that workers, ranks and epochs all get different but
    reproducible augmentations. Albumentations keeps its own random state, which a forked worker
    would otherwise copy from the main process (every worker repeating the same augmentations).
    """
    seed = mixed_seed(torch.initial_seed(), getattr(rank_zero_only, "rank", 0) or 0)
    np.random.seed(seed)
    random.seed(seed)
    info = get_worker_info()
    transform = getattr(info.dataset, "transform", None) if info is not None else None
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed)


class SkinFusionDataModule(pl.LightningDataModule):
    """Train/val/test/predict loaders over a manifest, or over generated synthetic lesions.

    With ``manifest`` (a prepared manifest from ``skinfusion prepare`` or any generic manifest CSV:
    ``image[,mask,label,lesion_id,age,sex,site,split]``, paths relative to the CSV) the images are
    read from the paths it lists. Rows without a ``split`` are assigned one by
    :func:`~skinfusion.data.split.assign_splits` (lesion-grouped, label-stratified, ``seed``).
    Without a manifest, ``synthetic_samples`` synthetic lesions are written once to ``root``
    (default: ``$SKINFUSION_CACHE`` or ``~/.cache/skinfusion``, ``synthetic/<hash>``).

    ``setup`` checks the files of the splits it builds and raises :class:`DataError` naming the
    first bad file before any training step; labels are checked as soon as the manifest is read.

    Args:
        manifest: manifest CSV; ``None`` uses synthetic data.
        root: folder of the synthetic data (only without ``manifest``).
        synthetic_samples: number of synthetic images.
        synthetic_size: side of the synthetic images in pixels.
        synthetic_mask_fraction: fraction of synthetic images that keep their mask.
        synthetic_label_fraction: fraction of synthetic images that keep their label.
        image_size: side of the network input (images are resized/cropped to a square).
        batch_size: samples per batch.
        num_workers: DataLoader worker processes.
        persistent_workers: keep workers alive between epochs (ignored with no workers).
        pin_memory: pin host memory; ``None`` pins when CUDA is available.
        normalization: ``unit`` ([0,1], the paper) or ``imagenet`` (for ImageNet-pretrained encoders).
        augment: train-time augmentation (flips, rotation, zoom, crop).
        color_jitter: colour jitter strength in [0, 1) (0: off).
        class_names: class list (default: the seven ISIC 2018 classes).
        label_map: rename labels before they are checked against ``class_names`` (e.g. merge
            ``{"MEL": "SCC", "BCC": "SCC"}``); map a label to ``""`` to drop it (the image stays,
            unlabelled). Labels not in the map are kept.
        balanced_sampling: draw training samples with probability proportional to ``count(class)^-power``
            (unlabelled samples get the mean weight): ``True`` (power 1) draws every class equally often, a float
            in (0, 1) (``0.5``: square-root sampling) part-way, ``False``/0 keeps the data's frequencies. The
            loss's ``class_weights="auto"`` and ``class_priors="auto"`` correct the imbalance that remains
            (:attr:`class_frequencies`), so that sampling and weighting never correct it twice.
        use_metadata: add encoded clinical metadata (``meta``) to batches.
        metadata_dropout: training only: probability that a sample's metadata (age, sex, site) is withheld whole,
            so that the network sees "unknown" for every class (in the pool only HAM10000 images have metadata:
            without this, "unknown" means "an ISIC Task 1 image, so NV/MEL/BKL" and image-only predictions
            lose the other classes). Validation and test keep the metadata the data has.
        metadata_field_dropout: training only: probability that each field is withheld otherwise.
        fractions: train/val/test fractions for rows without a split.
        cv_folds: lesion-grouped, label-stratified cross-validation over the training and validation splits
            together (:func:`~skinfusion.data.split.assign_folds`, seeded by ``cv_seed``, not ``seed``, so every
            training seed sees the same folds): validation is fold ``cv_fold`` and training the other folds. The
            ``cv_folds`` runs of folds ``0 .. cv_folds - 1`` score every lesion of the pool once, rare classes
            included (the 10 % validation split holds 5 DF lesions). The test split is left as it is. 0: off.
        cv_fold: the validation fold, ``0 .. cv_folds - 1``.
        cv_seed: seed of the fold assignment.
        seed: seed of the split, shuffling, sampling and augmentation.
        max_side: read images downscaled to this longest side (for large originals); ``None``: full size.
        drop_last: drop the last incomplete training batch (when there is more than one batch).
        validate: file check at ``setup``: ``exists``, ``header`` (readable header, mask size equals
            image size; the default) or ``full`` (decode every file; slow on large sets).
        predict_manifest: manifest of the images to predict; ``None`` predicts ``predict_split``
            of ``manifest``.
        predict_split: ``train``, ``val``, ``test`` or ``all``.
        normalize_on_device: workers yield uint8 images and masks (augmented on uint8, a quarter of the bytes
            through worker pipes, pinning and host-to-device copies) and :meth:`on_after_batch_transfer`
            normalises them on the training device, so batches after transfer still follow the Batch contract
            (float32 normalised image, float32 mask). Same values as normalising in the workers.
    """

    def __init__(
        self,
        manifest: str | None = None,
        root: str | None = None,
        synthetic_samples: int = 600,
        synthetic_size: int = 128,
        synthetic_mask_fraction: float = 1.0,
        synthetic_label_fraction: float = 1.0,
        image_size: int = 224,
        batch_size: int = 16,
        num_workers: int = 2,
        persistent_workers: bool = False,
        pin_memory: bool | None = None,
        normalization: Literal["unit", "imagenet"] = "imagenet",
        augment: bool = True,
        color_jitter: float = 0.0,
        class_names: list[str] | None = None,
        label_map: dict[str, str] | None = None,
        balanced_sampling: bool | float = False,
        use_metadata: bool = False,
        metadata_dropout: float = 0.0,
        metadata_field_dropout: float = 0.0,
        fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
        cv_folds: int = 0,
        cv_fold: int = 0,
        cv_seed: int = 0,
        seed: int = 0,
        max_side: int | None = None,
        drop_last: bool = True,
        validate: Literal["exists", "header", "full"] = "header",
        predict_manifest: str | None = None,
        predict_split: Literal["train", "val", "test", "all"] = "test",
        normalize_on_device: bool = False,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if normalization not in ("unit", "imagenet"):
            raise ValueError(f"normalization must be 'unit' or 'imagenet', got {normalization!r}")
        if validate not in ("exists", "header", "full"):
            raise ValueError(f"validate must be 'exists', 'header' or 'full', got {validate!r}")
        if predict_split not in (*SPLITS, "all"):
            raise ValueError(f"predict_split must be train/val/test/all, got {predict_split!r}")
        names = list(ISIC_CLASSES if class_names is None else class_names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"class_names must be a non-empty list of distinct names, got {class_names}")
        if not 0.0 <= float(balanced_sampling) <= 1.0:
            raise ValueError(f"balanced_sampling must be a bool or a power in [0, 1], got {balanced_sampling}")
        for name, value in (("metadata_dropout", metadata_dropout), ("metadata_field_dropout", metadata_field_dropout)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if cv_folds == 1 or cv_folds < 0 or (cv_folds and not 0 <= cv_fold < cv_folds):
            raise ValueError(
                f"cv_folds must be 0 (off) or >= 2 and cv_fold in [0, cv_folds), got {cv_folds}, {cv_fold}"
            )
        normalized = normalized_fractions(fractions)
        self.save_hyperparameters()
        self.manifest = manifest
        self.synthetic_samples = synthetic_samples
        self.synthetic_size = synthetic_size
        self.synthetic_mask_fraction = synthetic_mask_fraction
        self.synthetic_label_fraction = synthetic_label_fraction
        self.image_size = image_size
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers and num_workers > 0
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.normalization = normalization
        self.normalize_on_device = normalize_on_device
        self.augment = augment
        self.color_jitter = color_jitter
        self._class_names = tuple(names)
        self.label_map = dict(label_map) if label_map else None
        self.balanced_sampling = float(balanced_sampling)
        self.use_metadata = use_metadata
        self.metadata_dropout = metadata_dropout
        self.metadata_field_dropout = metadata_field_dropout
        self.fractions = normalized
        self.cv_folds, self.cv_fold, self.cv_seed = cv_folds, cv_fold, cv_seed
        self.seed = seed
        self.max_side = max_side
        self.drop_last = drop_last
        self.validate = validate
        self.predict_manifest = predict_manifest
        self.predict_split = predict_split
        self.root = self._synthetic_root(root) if manifest is None else None
        self._records: dict[str, list[Record]] | None = None
        self.datasets: dict[str, SkinLesionDataset] = {}

    # ------------------------------------------------------------------ derived facts

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names, in the order of the class indices."""
        return self._class_names

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self._class_names)

    @property
    def meta_dim(self) -> int:
        """Length of the ``meta`` vector in batches (0 when metadata is off)."""
        return META_DIM if self.use_metadata else 0

    @property
    def class_counts(self) -> list[int]:
        """Number of labelled training images per class (reads the manifest, not the images)."""
        counts = Counter(r.label for r in self.records("train") if r.label is not None)
        return [counts.get(name, 0) for name in self._class_names]

    @property
    def class_frequencies(self) -> list[float]:
        """Expected share of each class among the labelled training draws (after ``balanced_sampling``)."""
        counts = np.asarray(self.class_counts, dtype=np.float64)
        drawn = counts * np.where(counts > 0, np.maximum(counts, 1) ** -self.balanced_sampling, 0.0)
        return (drawn / drawn.sum()).tolist() if drawn.sum() > 0 else [1.0 / len(counts)] * len(counts)

    @property
    def class_weights(self) -> list[float]:
        """Inverse :attr:`class_frequencies` (the training labels as drawn), scaled to mean 1 over present classes.

        A class with no training image gets weight 0 (it never occurs as a target); with ``balanced_sampling``
        true every present class gets 1 (the sampler has balanced them already).
        """
        from skinfusion.training.losses import inverse_frequency

        return inverse_frequency(self.class_frequencies)

    # ------------------------------------------------------------------ records

    def _synthetic_root(self, root: str | None) -> Path:
        if root is not None:
            return Path(root).expanduser()
        params = [
            SYNTHETIC_VERSION,
            self.synthetic_samples,
            self.synthetic_size,
            self.seed,
            list(self._class_names),
            self.synthetic_mask_fraction,
            self.synthetic_label_fraction,
            list(self.fractions),
        ]
        key = hashlib.sha1(json.dumps(params).encode()).hexdigest()[:12]
        cache = Path(os.environ.get("SKINFUSION_CACHE", "~/.cache/skinfusion")).expanduser()
        return cache / "synthetic" / f"n{self.synthetic_samples}-s{self.synthetic_size}-{key}"

    def _synthetic_args(self) -> dict[str, Any]:
        return {
            "n": self.synthetic_samples,
            "seed": self.seed,
            "class_names": self._class_names,
            "mask_fraction": self.synthetic_mask_fraction,
            "label_fraction": self.synthetic_label_fraction,
            "fractions": self.fractions,
        }

    def _read_records(self) -> list[Record]:
        if self.manifest is None:
            return synthetic_records(self.root, **self._synthetic_args())
        return create_reader("manifest", self.manifest).read()

    def _map_labels(self, records: Sequence[Record], source: str | Path, strict: bool = True) -> list[Record]:
        """Apply ``label_map`` and check labels; unknown labels raise (``strict``) or are dropped."""
        out = []
        for record in records:
            label = apply_label_map(record.label, self.label_map) or None
            if label is not None and label not in self._class_names:
                if strict:
                    raise DataError(
                        record.image,
                        f"unknown label {label!r} (in {source}); expected one of {list(self._class_names)}"
                        + ("" if self.label_map else ", or set label_map"),
                    )
                label = None
            out.append(record if label == record.label else replace(record, label=label))
        return out

    def records(self, split: Literal["train", "val", "test", "all"]) -> list[Record]:
        """Records of one split (labels mapped and checked), read once from the manifest.

        Raises:
            DataError: unreadable manifest, duplicate image ids or unknown labels.
        """
        if self._records is None:
            source = self.manifest or self.root
            records = self._map_labels(self._read_records(), source)
            check_unique_ids(records)
            fixed = {r.id: r.meta["split"] for r in records if r.meta.get("split")}
            splits = (
                fixed if len(fixed) == len(records) else assign_splits(records, self.fractions, self.seed, fixed=fixed)
            )
            by_split: dict[str, list[Record]] = {s: [] for s in SPLITS}
            for record in records:
                by_split[splits[record.id]].append(record)
            if self.cv_folds:
                pool = by_split["train"] + by_split["val"]
                folds = assign_folds(pool, self.cv_folds, self.cv_seed)
                by_split["val"] = [r for r in pool if folds[r.id] == self.cv_fold]
                by_split["train"] = [r for r in pool if folds[r.id] != self.cv_fold]
                log.info(
                    "cross-validation: fold %d of %d validates (%d images)",
                    self.cv_fold,
                    self.cv_folds,
                    len(by_split["val"]),
                )
            for name in ("train", "val"):  # an image with neither annotation teaches nothing
                annotated = [r for r in by_split[name] if r.label is not None or r.mask is not None]
                if left_out := len(by_split[name]) - len(annotated):
                    log.info("%s: %d image(s) without mask or label left out", name, left_out)
                by_split[name] = annotated
            by_split["all"] = records
            self._records = by_split
        return self._records[split]

    def _predict_records(self) -> list[Record]:
        if self.predict_manifest is None:
            return self.records(self.predict_split)
        return self._map_labels(create_reader("manifest", self.predict_manifest).read(), self.predict_manifest, False)

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Write the synthetic data set (once), or check that the manifest exists."""
        if self.manifest is None:
            write_synthetic(self.root, size=self.synthetic_size, **self._synthetic_args())
        for path in (self.manifest, self.predict_manifest):
            if path is not None and not Path(path).is_file():
                raise DataError(path, "manifest not found")

    def _check_files(self, records: Sequence[Record]) -> None:
        if self.validate == "full":
            problems = validate_records(records, self._class_names)
        else:
            problems = []
            for record in records:
                try:
                    if self.validate == "header":
                        check_sizes(record)
                        continue
                    for path in (record.image, record.mask):
                        if path is not None and not Path(path).is_file():
                            raise DataError(path, "file not found")
                except DataError as err:
                    problems.append(err)
        if problems:
            first = problems[0]
            more = f" ({len(problems) - 1} more problem(s), e.g. {problems[1]})" if len(problems) > 1 else ""
            raise DataError(first.path, first.reason + more)

    def _dataset(self, split: str, records: Sequence[Record]) -> SkinLesionDataset:
        self._check_files(records)
        transform = build_transforms(
            "train" if split == "train" else "val",
            self.image_size,
            self.normalization,
            augment=self.augment,
            color_jitter=self.color_jitter,
            normalize=not self.normalize_on_device,
            seed=mixed_seed(
                self.seed, getattr(rank_zero_only, "rank", 0) or 0, SPLITS.index(split) if split in SPLITS else 3
            ),
        )
        dropout = (self.metadata_dropout, self.metadata_field_dropout) if split == "train" else (0.0, 0.0)
        return SkinLesionDataset(records, self._class_names, transform, self.use_metadata, self.max_side, *dropout)

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets of ``stage`` (``fit``, ``validate``, ``test``, ``predict``; ``None``: all).

        Raises:
            DataError: a missing or unreadable file, a mask whose size differs from its image, an
                unknown label or an empty training split.
        """
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
            None: ("train", "val", "test", "predict"),
        }
        if stage not in wanted:
            raise ValueError(f"unknown stage {stage!r}")
        for split in wanted[stage]:
            if split in self.datasets:
                continue
            records = self._predict_records() if split == "predict" else self.records(split)
            if split == "train" and not records:
                raise DataError(self.manifest or self.root, "the training split is empty")
            self.datasets[split] = self._dataset(split, records)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """With ``normalize_on_device``: uint8 image/mask -> float32 normalised image and {0,1} mask, on the device."""
        if self.normalize_on_device and isinstance(batch, dict) and batch.get("image") is not None:
            if batch["image"].dtype == torch.uint8:
                batch["image"] = normalize_tensor(batch["image"], self.normalization)
            if batch.get("mask") is not None and batch["mask"].dtype == torch.uint8:
                batch["mask"] = batch["mask"].float()
        return batch

    # ------------------------------------------------------------------ loaders

    def _loader(self, split: str, sampler: Any = None, drop_last: bool = False, dataset: Any = None) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"call setup() before asking for the {split} dataloader")
        if sampler is None and distributed_world()[0] > 1:
            # Every sample once over all processes (DistributedSampler pads with repeats, counted twice).
            sampler = UnpaddedDistributedSampler(len(self.datasets[split]))
        return DataLoader(
            self.datasets[split] if dataset is None else dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
            pin_memory=self.pin_memory,
            worker_init_fn=seed_worker,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def sample_weights(self) -> torch.Tensor:
        """Per-sample weights of the balanced sampler: (training count of the sample's class) ^ -power.

        Unlabelled samples get the mean weight of the labelled ones (1 if there are none).
        """
        if "train" not in self.datasets:
            raise RuntimeError("call setup('fit') before asking for sample weights")
        labels = torch.as_tensor(self.datasets["train"].labels, dtype=torch.int64)
        labelled = labels >= 0
        weights = torch.ones(len(labels), dtype=torch.float64)
        if labelled.any():
            counts = torch.bincount(labels[labelled], minlength=self.num_classes).double()
            weights[labelled] = counts[labels[labelled]] ** -self.balanced_sampling
            weights[~labelled] = weights[labelled].mean()
        return weights

    def train_dataloader(self) -> DataLoader:
        """Training batches in an order fixed by ``(seed, epoch)``, augmented with seeds ``(seed, epoch, index)``.

        A fit resumed from a mid-epoch checkpoint continues with the batches that epoch had not yet
        consumed (see :mod:`skinfusion.data.sampling`); under DDP each process takes its shard.
        """
        if "train" not in self.datasets:
            raise RuntimeError("call setup() before asking for the train dataloader")
        dataset = self.datasets["train"]
        drop_last = self.drop_last and len(dataset) > self.batch_size
        weights = self.sample_weights() if self.balanced_sampling else None
        sampler = ResumableSampler(len(dataset), shuffle=True, seed=self.seed, weights=weights, with_epoch=True)
        num_batches = len(sampler) // self.batch_size if drop_last else math.ceil(len(sampler) / self.batch_size)
        trainer = getattr(self, "trainer", None)
        epoch, done = resume_position(trainer, batches_per_epoch(trainer, num_batches))
        sampler.set_epoch(epoch)
        sampler.skip(done * self.batch_size)
        return self._loader(
            "train", sampler=sampler, drop_last=drop_last, dataset=EpochSeededDataset(dataset, self.seed)
        )

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
