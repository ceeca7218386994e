"""Synthetic lesions: exact masks, per-index determinism, class-dependent appearance, the written manifest."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from skinfusion.data.records import ISIC_CLASSES
from skinfusion.data.synthetic import (
    MANIFEST_COLUMNS,
    make_lesion,
    synthetic_class,
    synthetic_records,
    synthetic_rows,
    write_synthetic,
)


@pytest.mark.parametrize("size", [32, 64, 128])
def test_make_lesion_shapes_and_binary_mask(size):
    for index in range(10):
        image, mask, label = make_lesion(index, seed=0, size=size)
        assert image.shape == (size, size, 3)
        assert image.dtype == np.uint8
        assert mask.shape == (size, size)
        assert mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
        assert 0 < mask.sum() < size * size  # one lesion, some skin around it
        assert 0 <= label < len(ISIC_CLASSES)


def test_make_lesion_depends_only_on_seed_and_index():
    first = make_lesion(7, seed=3, size=64)
    for other in range(5):  # render other samples in between: no shared random state
        make_lesion(other, seed=3, size=64)
    again = make_lesion(7, seed=3, size=64)
    assert np.array_equal(first[0], again[0])
    assert np.array_equal(first[1], again[1])
    assert first[2] == again[2] == synthetic_class(7, 3)
    assert not np.array_equal(first[0], make_lesion(7, seed=4, size=64)[0])
    assert not np.array_equal(first[0], make_lesion(8, seed=3, size=64)[0])


def test_class_index_forces_the_class():
    for class_index in range(len(ISIC_CLASSES)):
        assert make_lesion(0, 0, 32, class_index=class_index)[2] == class_index


def test_classes_are_balanced_and_cover_all():
    labels = [synthetic_class(i, 0) for i in range(700)]
    counts = np.bincount(labels, minlength=7)
    assert (counts > 60).all()  # uniform: 100 expected per class


def test_class_dependent_appearance():
    """The designed differences hold on average: DF small, MEL large and dark, VASC red."""

    def stats(class_name):
        areas, darkness, redness = [], [], []
        for i in range(30):
            image, mask, _ = make_lesion(i, 0, 64, class_index=ISIC_CLASSES.index(class_name))
            lesion = image[mask.astype(bool)].astype(float)
            areas.append(mask.mean())
            darkness.append(255 - lesion.mean())
            redness.append(lesion[:, 0].mean() - lesion[:, 1].mean())
        return np.mean(areas), np.mean(darkness), np.mean(redness)

    mel, df, vasc, nv = stats("MEL"), stats("DF"), stats("VASC"), stats("NV")
    assert df[0] < nv[0] < mel[0]  # radius ranges 0.2-0.38 < 0.3-0.6 < 0.45-0.78 of half the side
    assert mel[1] > nv[1]  # MEL darkest (dark brown with black/blue-grey blotches)
    assert mel[1] > df[1]
    assert vasc[2] > nv[2]  # red minus green: VASC is red/purple, NV brown


def test_make_lesion_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        make_lesion(0, size=8)
    with pytest.raises(ValueError, match="class_index"):
        make_lesion(0, class_index=7)
    with pytest.raises(ValueError, match="num_classes"):
        make_lesion(0, num_classes=0)


def test_write_synthetic_files_match_make_lesion(tmp_path):
    records = write_synthetic(tmp_path / "syn", n=12, seed=1, size=48)
    assert len(records) == 12
    with (tmp_path / "syn" / "manifest.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == MANIFEST_COLUMNS
        rows = list(reader)
    for i, (record, row) in enumerate(zip(records, rows, strict=True)):
        image, mask, label = make_lesion(i, 1, 48)
        on_disk = cv2.cvtColor(cv2.imread(str(record.image)), cv2.COLOR_BGR2RGB)
        assert np.array_equal(on_disk, image)  # PNG is lossless
        assert np.array_equal(cv2.imread(str(record.mask), cv2.IMREAD_GRAYSCALE), mask * 255)
        assert record.label == row["label"] == ISIC_CLASSES[label]
        assert row["id"] == record.id
        assert row["split"] in ("train", "val", "test")
        assert (tmp_path / "syn" / row["image"]).resolve() == record.image.resolve()
        assert row["orig_width"] == row["orig_height"] == "48"


def test_write_synthetic_is_idempotent(tmp_path):
    root = tmp_path / "syn"
    write_synthetic(root, n=5, size=32)
    stamp = (root / "manifest.csv").stat().st_mtime_ns
    image_stamp = (root / "images" / "SYN_000000.png").stat().st_mtime_ns
    write_synthetic(root, n=5, size=32)
    assert (root / "manifest.csv").stat().st_mtime_ns == stamp
    assert (root / "images" / "SYN_000000.png").stat().st_mtime_ns == image_stamp
    records = write_synthetic(root, n=6, size=32)  # other parameters: rewritten
    assert len(records) == 6
    assert len(list(csv.DictReader((root / "manifest.csv").open()))) == 6


def test_mask_and_label_fractions_mix_annotations(tmp_path):
    records = write_synthetic(tmp_path, n=200, size=32, mask_fraction=0.6, label_fraction=0.6)
    has_mask = np.array([r.mask is not None for r in records])
    has_label = np.array([r.label is not None for r in records])
    assert (has_mask | has_label).all()  # every sample keeps an annotation
    # P(mask only) = P(label only) = 0.4, P(both) = 0.2
    assert 0.3 < (has_mask & ~has_label).mean() < 0.5
    assert 0.3 < (~has_mask & has_label).mean() < 0.5
    assert 0.1 < (has_mask & has_label).mean() < 0.3
    for record in records:
        if record.mask is not None:
            assert record.mask.is_file()
        else:
            assert not (tmp_path / "masks" / f"{record.id}_segmentation.png").exists()


def test_synthetic_records_need_no_files(tmp_path):
    kwargs = {"n": 20, "seed": 2, "mask_fraction": 0.7, "label_fraction": 0.5}
    planned = synthetic_records(tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists()
    written = write_synthetic(tmp_path / "a", size=32, **kwargs)
    assert planned == written


def test_rows_are_stable_when_n_grows():
    small = synthetic_rows(10, seed=5, mask_fraction=0.5, label_fraction=0.7)
    large = synthetic_rows(30, seed=5, mask_fraction=0.5, label_fraction=0.7)
    assert small == large[:10]


def test_split_fractions():
    rows = synthetic_rows(1000, fractions=(0.6, 0.2, 0.2))
    share = {s: np.mean([r["split"] == s for r in rows]) for s in ("train", "val", "test")}
    assert abs(share["train"] - 0.6) < 0.05
    assert abs(share["val"] - 0.2) < 0.04


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 0}, "n must be positive"),
        ({"n": 5, "mask_fraction": 1.5}, "mask_fraction"),
        ({"n": 5, "mask_fraction": 0.3, "label_fraction": 0.5}, ">= 1"),
        ({"n": 5, "fractions": (1, 1)}, "fractions"),
    ],
)
def test_synthetic_rows_reject_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        synthetic_rows(**kwargs)
