"""Dataset and DataModule: Batch contract, mixed annotations, splits, weights, sampling, early errors."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from skinfusion.data import ISIC_CLASSES, Record, SkinFusionDataModule, SkinLesionDataset, build_transforms
from skinfusion.data.dataset import META_DIM, SITES, encode_metadata
from skinfusion.errors import DataError

COLUMNS = ["image", "mask", "label", "lesion_id", "age", "sex", "site"]


def _write_pair(root: Path, name: str, with_mask: bool, size: tuple[int, int] = (40, 30)) -> tuple[str, str]:
    """A coloured image with a white rectangle and, optionally, its mask; returns relative paths."""
    width, height = size
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    image = np.full((height, width, 3), (40, 90, 160), np.uint8)
    image[height // 4 : height // 2, width // 4 : width // 2] = 255
    cv2.imwrite(str(root / "images" / f"{name}.png"), image)
    if not with_mask:
        return f"images/{name}.png", ""
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : height // 2, width // 4 : width // 2] = 255
    cv2.imwrite(str(root / "masks" / f"{name}_segmentation.png"), mask)
    return f"images/{name}.png", f"masks/{name}_segmentation.png"


def _write_manifest(root: Path, rows: list[dict[str, str]], columns=COLUMNS) -> Path:
    path = root / "manifest.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _mixed_manifest(root: Path, labels: list[str | None] | None = None, masks: list[bool] | None = None) -> Path:
    """A generic manifest: by default 30 images, cycling mask+label / mask only / label only."""
    labels = labels if labels is not None else [ISIC_CLASSES[i % 3] if i % 3 != 1 else None for i in range(30)]
    masks = masks if masks is not None else [i % 3 != 2 for i in range(len(labels))]
    rows = []
    for i, (label, with_mask) in enumerate(zip(labels, masks, strict=True)):
        image, mask = _write_pair(root, f"IMG_{i:04d}", with_mask, size=(40 + i % 5, 30))
        rows.append(
            {
                "image": image,
                "mask": mask,
                "label": label or "",
                "lesion_id": f"L{i // 2}",
                "age": str(20 + i),
                "sex": "male" if i % 2 else "female",
                "site": SITES[i % len(SITES)],
            }
        )
    return _write_manifest(root, rows)


# ---------------------------------------------------------------- metadata


def test_encode_metadata_layout():
    vector = encode_metadata({"age": 45.0, "sex": "female", "site": "Lower_Extremity"})
    assert vector.shape == (META_DIM,)
    assert 2 + 3 + len(SITES) + 1 == META_DIM
    assert vector[0] == pytest.approx(0.45)
    assert vector[1] == 0.0  # age present
    assert vector[2:5].tolist() == [0.0, 1.0, 0.0]  # female
    sites = vector[5:]
    assert sites[SITES.index("lower extremity")] == 1.0
    assert sites.sum() == 1.0


def test_encode_metadata_missing_values():
    vector = encode_metadata({"age": "", "sex": "unknown", "site": "moon"})
    assert vector[0] == 0.0
    assert vector[1] == 1.0
    assert vector[2:5].tolist() == [0.0, 0.0, 1.0]
    assert vector[-1] == 1.0  # unknown site
    assert vector.sum() == 3.0
    assert encode_metadata({"site": "posterior torso"})[5 + SITES.index("back")] == 1.0


# ---------------------------------------------------------------- dataset


def test_dataset_batch_mixes_mask_only_label_only_and_both(tmp_path):
    root = tmp_path / "data"
    _write_pair(root, "A", True)
    _write_pair(root, "B", True)
    _write_pair(root, "C", False)
    records = [
        Record(root / "images/A.png", root / "masks/A_segmentation.png", "MEL", meta={"age": 50.0}),
        Record(root / "images/B.png", root / "masks/B_segmentation.png", None),
        Record(root / "images/C.png", None, "VASC", meta={"sex": "male"}),
    ]
    transform = build_transforms("val", 24, "unit")
    dataset = SkinLesionDataset(records, ISIC_CLASSES, transform, use_metadata=True)
    batch = default_collate([dataset[i] for i in range(3)])
    assert batch["image"].shape == (3, 3, 24, 24)
    assert batch["image"].dtype == torch.float32
    assert batch["mask"].shape == (3, 1, 24, 24)
    assert batch["has_mask"].tolist() == [True, True, False]
    assert batch["has_mask"].dtype == torch.bool
    assert batch["label"].tolist() == [0, -1, 6]
    assert batch["label"].dtype == torch.int64
    assert batch["id"] == ["A", "B", "C"]
    assert batch["meta"].shape == (3, META_DIM)
    assert batch["meta"][0, 0] == pytest.approx(0.5)
    # the white rectangle covers x 10..19 of 40 and y 7..14 of 30: after resizing to 24 the mask is
    # one there and the image white
    assert batch["mask"][0].sum() > 0
    assert torch.equal(batch["mask"][0], batch["mask"][1])
    assert batch["mask"][2].sum() == 0  # no mask: zeros
    inside = batch["mask"][0, 0].bool()
    assert torch.all(batch["image"][0][:, inside] > 0.9)


def test_dataset_rejects_unknown_label_and_size_mismatch(tmp_path):
    root = tmp_path / "data"
    _write_pair(root, "A", True, size=(40, 30))
    _write_pair(root, "B", True, size=(20, 30))
    with pytest.raises(DataError, match="A.png.*unknown label 'XYZ'"):
        SkinLesionDataset([Record(root / "images/A.png", label="XYZ")], ISIC_CLASSES)
    bad = SkinLesionDataset([Record(root / "images/A.png", root / "masks/B_segmentation.png")], ISIC_CLASSES)
    with pytest.raises(DataError, match="B_segmentation.png: mask is 20x30"):
        bad[0]


def test_dataset_max_side_keeps_mask_aligned(tmp_path):
    root = tmp_path / "data"
    _write_pair(root, "A", True, size=(80, 60))
    dataset = SkinLesionDataset(
        [Record(root / "images/A.png", root / "masks/A_segmentation.png")], ISIC_CLASSES, max_side=40
    )
    image, mask = dataset.load(0)
    assert image.shape == (30, 40, 3)
    assert mask.shape == (30, 40)
    assert mask[7:15, 10:20].all()
    assert mask.sum() == 8 * 10


# ---------------------------------------------------------------- datamodule from a manifest


def test_datamodule_from_generic_manifest(tmp_path):
    manifest = _mixed_manifest(tmp_path / "data")
    dm = SkinFusionDataModule(str(manifest), image_size=32, batch_size=4, num_workers=0, use_metadata=True)
    assert dm.num_classes == 7
    assert dm.meta_dim == META_DIM
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    ids = [r.id for s in ("train", "val", "test") for r in dm.records(s)]
    assert sorted(ids) == [f"IMG_{i:04d}" for i in range(30)]  # every image in exactly one split
    for split in ("train", "val", "test"):  # images of one lesion stay together
        lesions = {(int(r.id[4:]) // 2) for r in dm.records(split)}
        others = {(int(r.id[4:]) // 2) for s in ("train", "val", "test") if s != split for r in dm.records(s)}
        assert not lesions & others
    seen = []
    for batch in dm.train_dataloader():
        assert batch["image"].shape[1:] == (3, 32, 32)
        assert batch["meta"].shape[1] == META_DIM
        for i, sample_id in enumerate(batch["id"]):
            index = int(sample_id[4:])
            assert batch["has_mask"][i] == (index % 3 != 2)
            assert batch["label"][i] == (-1 if index % 3 == 1 else index % 3)
            if not batch["has_mask"][i]:
                assert batch["mask"][i].sum() == 0
            seen.append(sample_id)
    assert len(seen) == len(dm.records("train")) // 4 * 4  # drop_last
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape[1:] == (3, 32, 32)


def test_class_weights_and_counts(tmp_path):
    labels = ["MEL"] * 6 + ["NV"] * 3 + ["BCC"] * 1
    rows = []
    for i, label in enumerate(labels):
        image, _ = _write_pair(tmp_path, f"I{i}", False)
        rows.append({"image": image, "label": label})
    for i in range(2):  # unlabelled images with a mask do not count
        image, mask = _write_pair(tmp_path, f"U{i}", True)
        rows.append({"image": image, "mask": mask})
    rows = [{**row, "split": "train"} for row in rows]
    manifest = _write_manifest(tmp_path, rows, columns=[*COLUMNS, "split"])
    dm = SkinFusionDataModule(str(manifest), num_workers=0, class_names=["MEL", "NV", "BCC", "DF"])
    # before setup: read from the manifest alone
    assert dm.class_counts == [6, 3, 1, 0]
    # inverse counts 1/6, 1/3, 1 scaled to mean 1 over the 3 present classes: 3 / (1/6 + 1/3 + 1) = 2
    assert dm.class_weights == pytest.approx([2 / 6, 2 / 3, 2.0, 0.0])
    assert dm.num_classes == 4


def test_label_map_merges_and_drops(tmp_path):
    manifest = _mixed_manifest(tmp_path, labels=["MEL", "BCC", "NV", "AKIEC"] * 3, masks=[True] * 12)
    dm = SkinFusionDataModule(
        str(manifest),
        num_workers=0,
        class_names=["SCC", "NV"],
        label_map={"MEL": "SCC", "BCC": "SCC", "AKIEC": ""},
        fractions=(1.0, 0.0, 0.0),
    )
    labels = Counter(r.label for r in dm.records("train"))
    assert labels == {"SCC": 6, "NV": 3, None: 3}


def test_unknown_label_fails_before_training(tmp_path):
    manifest = _mixed_manifest(tmp_path, labels=["MEL", "BOGUS"], masks=[True, True])
    dm = SkinFusionDataModule(str(manifest), num_workers=0)
    dm.prepare_data()
    with pytest.raises(DataError, match=r"IMG_0001\.png.*unknown label 'BOGUS'"):
        dm.setup("fit")


def test_missing_file_fails_at_setup(tmp_path):
    manifest = _mixed_manifest(tmp_path, labels=["MEL"] * 6, masks=[True] * 6)
    (tmp_path / "masks" / "IMG_0003_segmentation.png").unlink()
    for validate in ("exists", "header", "full"):
        dm = SkinFusionDataModule(str(manifest), num_workers=0, validate=validate, fractions=(1.0, 0.0, 0.0))
        with pytest.raises(DataError, match="IMG_0003_segmentation.png"):
            dm.setup("fit")


def test_mask_size_mismatch_fails_at_setup(tmp_path):
    image, _ = _write_pair(tmp_path, "A", False, size=(40, 30))
    _, mask = _write_pair(tmp_path, "B", True, size=(30, 30))
    manifest = _write_manifest(tmp_path, [{"image": image, "mask": mask, "label": "NV"}])
    dm = SkinFusionDataModule(str(manifest), num_workers=0, fractions=(1.0, 0.0, 0.0))
    with pytest.raises(DataError, match="B_segmentation.png.*30x30"):
        dm.setup("fit")


def test_missing_manifest_fails_in_prepare_data(tmp_path):
    dm = SkinFusionDataModule(str(tmp_path / "nope.csv"), num_workers=0)
    with pytest.raises(DataError, match=r"nope\.csv"):
        dm.prepare_data()


def test_predict_manifest_without_annotations(tmp_path):
    train = _mixed_manifest(tmp_path / "train")
    images = [_write_pair(tmp_path / "new", f"NEW_{i}", False)[0] for i in range(3)]
    predict = _write_manifest(tmp_path / "new", [{"image": image} for image in images])
    dm = SkinFusionDataModule(str(train), image_size=16, batch_size=2, num_workers=0, predict_manifest=str(predict))
    dm.setup("predict")
    batches = list(dm.predict_dataloader())
    assert [i for b in batches for i in b["id"]] == ["NEW_0", "NEW_1", "NEW_2"]
    assert not any(b["has_mask"].any() for b in batches)
    assert all((b["label"] == -1).all() for b in batches)


def test_balanced_sampler_balances_classes(tmp_path):
    labels = ["MEL"] * 48 + ["NV"] * 12 + ["BCC"] * 4
    rows = []
    for i, label in enumerate(labels):
        image, _ = _write_pair(tmp_path, f"I{i:03d}", False, size=(8, 8))
        rows.append({"image": image, "label": label, "split": "train"})
    manifest = _write_manifest(tmp_path, rows, columns=[*COLUMNS, "split"])
    counts = {}
    for balanced in (False, True, 0.5):
        dm = SkinFusionDataModule(
            str(manifest), image_size=8, batch_size=16, num_workers=0, balanced_sampling=balanced, augment=False
        )
        dm.setup("fit")
        drawn = Counter()
        for _ in range(5):
            for batch in dm.train_dataloader():
                drawn.update(batch["label"].tolist())
        counts[balanced] = drawn
    total = sum(counts[True].values())
    assert total == 5 * 64
    for c in range(3):  # each of the 3 classes ~1/3 of the draws
        assert abs(counts[True][c] / total - 1 / 3) < 0.08
    assert counts[False][0] / total == pytest.approx(48 / 64)  # plain shuffling: each image once
    # Square-root sampling: shares proportional to 48 * 48^-0.5 : 12 * 12^-0.5 : 4 * 4^-0.5 = 6.93 : 3.46 : 2.
    roots = np.sqrt([48, 12, 4])
    for c in range(3):
        assert abs(counts[0.5][c] / total - roots[c] / roots.sum()) < 0.08


class _Counted(SkinFusionDataModule):
    class_counts = [36, 9, 1, 0]


def test_class_frequencies_and_weights_follow_the_sampling():
    dm = _Counted(class_names=["A", "B", "C", "D"])
    assert dm.class_frequencies == pytest.approx([36 / 46, 9 / 46, 1 / 46, 0.0])
    assert dm.class_weights == pytest.approx(np.array([1 / 36, 1 / 9, 1, 0]) * 3 / (1 / 36 + 1 / 9 + 1))
    dm.balanced_sampling = 0.5  # draws 6 : 3 : 1
    assert dm.class_frequencies == pytest.approx([0.6, 0.3, 0.1, 0.0])
    dm.balanced_sampling = 1.0
    assert dm.class_frequencies == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert dm.class_weights == pytest.approx([1.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError, match="balanced_sampling"):
        SkinFusionDataModule(balanced_sampling=2.0)


# ---------------------------------------------------------------- synthetic default


def test_synthetic_default_cache_and_batches(tmp_path):
    dm = SkinFusionDataModule(
        synthetic_samples=40,
        synthetic_size=32,
        synthetic_mask_fraction=0.7,
        synthetic_label_fraction=0.6,
        image_size=32,
        batch_size=8,
        num_workers=0,
    )
    assert dm.root.is_relative_to(tmp_path / "skinfusion-cache" / "synthetic")  # conftest sets SKINFUSION_CACHE
    weights_before = dm.class_weights  # known before any file exists
    assert not dm.root.exists()
    dm.prepare_data()
    assert (dm.root / "manifest.csv").is_file()
    dm.setup("fit")
    assert dm.class_weights == weights_before
    present = [w for w, n in zip(weights_before, dm.class_counts, strict=True) if n > 0]
    assert np.mean(present) == pytest.approx(1.0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 3, 32, 32)
    assert ((batch["label"] >= 0) | batch["has_mask"]).all()
    for i in range(8):
        assert (batch["mask"][i].sum() > 0) == batch["has_mask"][i]


def test_same_first_batch_with_two_workers(tmp_path):
    def first_batch(seed):
        dm = SkinFusionDataModule(
            root=str(tmp_path / "syn"),
            synthetic_samples=24,
            synthetic_size=32,
            image_size=32,
            batch_size=8,
            num_workers=2,
            color_jitter=0.2,
            seed=seed,
            fractions=(1.0, 0.0, 0.0),
        )
        dm.prepare_data()
        dm.setup("fit")
        loader = iter(dm.train_dataloader())
        return next(loader), next(loader)  # the second batch comes from the second worker

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    for i in range(2):
        assert a[i]["id"] == b[i]["id"]
        assert torch.equal(a[i]["image"], b[i]["image"])
        assert torch.equal(a[i]["mask"], b[i]["mask"])
    assert a[0]["id"] != c[0]["id"] or not torch.equal(a[0]["image"], c[0]["image"])


def test_workers_do_not_repeat_augmentations(tmp_path):
    """Two workers must not apply the same random augmentation to the same image."""
    image, mask = _write_pair(tmp_path, "ONE", True, size=(48, 48))
    rows = [{"image": image, "mask": mask, "label": "NV", "split": "train"}]
    manifest = _write_manifest(tmp_path, rows, columns=[*COLUMNS, "split"])
    dm = SkinFusionDataModule(str(manifest), image_size=32, batch_size=1, num_workers=2, drop_last=False)
    dm.setup("fit")
    dm.datasets["train"].records *= 4  # the same image four times: workers 0,1,0,1
    masks = [batch["mask"] for batch in dm.train_dataloader()]
    assert not torch.equal(masks[0], masks[1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="batch_size"):
        SkinFusionDataModule(batch_size=0)
    with pytest.raises(ValueError, match="class_names"):
        SkinFusionDataModule(class_names=["A", "A"])
    with pytest.raises(ValueError, match="fractions"):
        SkinFusionDataModule(fractions=(1.0, 0.0))


# ---------------------------------------------------------------- real data


@pytest.mark.real_data
def test_isic_sample_manifest(shared_data):
    manifest = shared_data / "isic-sample" / "manifest.csv"
    dm = SkinFusionDataModule(str(manifest), image_size=64, batch_size=8, num_workers=0, use_metadata=True)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    records = [r for s in ("train", "val", "test") for r in dm.records(s)]
    assert len(records) == 124
    assert sum(r.mask is not None for r in records) == 61
    assert sum(r.label is not None for r in records) == 124
    for batch in (next(iter(dm.train_dataloader())), next(iter(dm.test_dataloader()))):
        assert batch["image"].shape == (8, 3, 64, 64)
        assert batch["meta"].shape == (8, META_DIM)
        assert (batch["label"] >= 0).all()
        for i, sample_id in enumerate(batch["id"]):
            record = next(r for r in records if r.id == sample_id)
            assert batch["has_mask"][i] == (record.mask is not None)
            assert batch["label"][i] == ISIC_CLASSES.index(record.label)
            if record.mask is None:
                assert batch["mask"][i].sum() == 0
            else:  # a crop can lie entirely inside a large lesion, so only "not empty"
                assert batch["mask"][i].sum() > 0


def test_metadata_dropout_withholds_fields_in_training_only():
    """Training samples see metadata withheld (whole or per field), reproducibly per (seed, epoch, index);
    validation keeps what the data has."""
    from skinfusion.data.dataset import SkinLesionDataset, encode_metadata, withhold_metadata
    from skinfusion.data.records import Record
    from skinfusion.data.sampling import EpochSeededDataset

    meta = {"age": 40.0, "sex": "male", "site": "back"}
    rng = np.random.default_rng(0)
    draws = [withhold_metadata(meta, rng, all_fields=0.5) for _ in range(400)]
    whole = sum(d == {} for d in draws) / len(draws)
    assert 0.4 < whole < 0.6
    assert all(d in ({}, meta) for d in draws)  # all_fields alone never splits the fields
    rng = np.random.default_rng(1)
    per_field = [withhold_metadata(meta, rng, per_field=0.3) for _ in range(600)]
    for name in ("age", "sex", "site"):
        share = sum(name not in d for d in per_field) / len(per_field)
        assert 0.22 < share < 0.38, (name, share)

    image = np.zeros((8, 8, 3), np.uint8)
    records = [Record(image=f"ISIC_{i:07d}.png", label="NV", meta=meta) for i in range(64)]
    dataset = SkinLesionDataset(records, ["NV"], use_metadata=True, metadata_dropout=0.5)
    dataset.load = lambda index: (image, None)
    seeded = EpochSeededDataset(dataset, seed=3)
    unknown = encode_metadata({})
    first = [seeded[(0, i)]["meta"] for i in range(64)]
    again = [seeded[(0, i)]["meta"] for i in range(64)]
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))  # reproducible
    n_unknown = sum(bool(np.array_equal(m.numpy(), unknown)) for m in first)
    assert 16 < n_unknown < 48
    kept = SkinLesionDataset(records, ["NV"], use_metadata=True)
    kept.load = lambda index: (image, None)
    assert all(np.array_equal(kept[i]["meta"].numpy(), encode_metadata(meta)) for i in range(8))
    with pytest.raises(ValueError, match="metadata_dropout"):
        SkinLesionDataset(records, ["NV"], metadata_dropout=1.5)


def test_cross_validation_folds_partition_train_and_val(tmp_path):
    """cv_folds: the validation folds partition the manifest's train+val pool (each image once), training is the
    rest, the test split is untouched, and the folds do not move with the training seed."""
    from skinfusion.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "syn", n=60, size=32)
    manifest = str(tmp_path / "syn" / "manifest.csv")
    plain = SkinFusionDataModule(manifest=manifest)
    pool = {r.id for split in ("train", "val") for r in plain.records(split)}
    test = {r.id for r in plain.records("test")}
    seen: list[str] = []
    for fold in range(3):
        dm = SkinFusionDataModule(manifest=manifest, cv_folds=3, cv_fold=fold)
        val = {r.id for r in dm.records("val")}
        train = {r.id for r in dm.records("train")}
        assert val
        assert not val & train
        assert val | train == pool
        assert {r.id for r in dm.records("test")} == test
        seen += sorted(val)
        assert {
            r.id for r in SkinFusionDataModule(manifest=manifest, cv_folds=3, cv_fold=fold, seed=5).records("val")
        } == val
    assert sorted(seen) == sorted(pool)
    with pytest.raises(ValueError, match="cv_fold"):
        SkinFusionDataModule(cv_folds=3, cv_fold=3)
