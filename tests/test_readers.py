"""Readers on small trees built here, and on the real ISIC 2018 pool when SKINFUSION_DATA is set."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import pool_counts
from imgutil import disk, make_task1, make_task3, rgb, save

from skinfusion.data.readers import (
    DiagnosisCSVReader,
    ISICTask1Reader,
    ISICTask3Reader,
    ManifestReader,
    PH2Reader,
    apply_labels,
    combine,
    create_reader,
    list_readers,
)
from skinfusion.data.records import Record
from skinfusion.errors import DataError


def test_registry():
    assert set(list_readers()) == {"isic_task1", "isic_task3", "diagnosis_csv", "ph2", "manifest", "synthetic"}
    with pytest.raises(ValueError, match="unknown reader 'nope'; choose one of diagnosis_csv"):
        create_reader("nope", ".")
    with pytest.raises(ValueError, match="bad arguments"):
        create_reader("isic_task1", ".", bogus=1)


def test_task1_with_and_without_ground_truth(tmp_path):
    make_task1(tmp_path, ["ISIC_0000001", "ISIC_0000002"])
    make_task1(tmp_path, ["ISIC_0000100"], subset="Test", masks=False)
    records = create_reader("isic_task1", tmp_path).read()
    assert [r.id for r in records] == ["ISIC_0000001", "ISIC_0000002"]  # LICENSE/ATTRIBUTION ignored
    gt = tmp_path / "ISIC2018_Task1_Training_GroundTruth"
    assert records[0].mask == gt / "ISIC_0000001_segmentation.png"
    assert records[0].label is None
    assert records[0].source == "isic_task1"
    (test,) = ISICTask1Reader(tmp_path, subset="Test").read()
    assert test.id == "ISIC_0000100"
    assert test.mask is None
    with pytest.raises(DataError, match="image folder not found"):
        ISICTask1Reader(tmp_path, subset="Validation").read()


def test_task3_labels_metadata_masks(tmp_path):
    make_task3(tmp_path, {"ISIC_0024306": "NV", "ISIC_0024307": "MEL"}, lesions={"ISIC_0024307": "HAM_0000001"})
    (tmp_path / "HAM10000_segmentations_lesion_tschandl" / "ISIC_0024306_segmentation.png").unlink()
    a, b = ISICTask3Reader(tmp_path).read()
    assert (a.id, a.label, a.mask, a.lesion_id) == ("ISIC_0024306", "NV", None, "HAM_0000000")
    assert a.meta == {"age": 40.0, "sex": "female", "site": "back"}
    assert (b.label, b.lesion_id) == ("MEL", "HAM_0000001")
    assert b.mask.name == "ISIC_0024307_segmentation.png"
    (c,) = ISICTask3Reader(tmp_path, metadata=None, masks=None, label_map={"NV": "benign"}).read()[:1]
    assert (c.label, c.lesion_id, c.mask, c.meta) == ("benign", None, None, {})


@pytest.mark.parametrize("row", ["0.0,0.0,0.0,0.0,0.0,0.0,0.0", "1.0,1.0,0.0,0.0,0.0,0.0,0.0", "0.5,0.5,0,0,0,0,0"])
def test_task3_bad_one_hot_names_file_and_row(tmp_path, row):
    make_task3(tmp_path, {"ISIC_0024306": "NV", "ISIC_0024307": "MEL"})
    csv_path = tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"
    lines = csv_path.read_text().splitlines()
    lines[2] = "ISIC_0024307," + row
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"line 3 \(ISIC_0024307\): one-hot") as info:
        ISICTask3Reader(tmp_path).read()
    assert info.value.path == str(csv_path)


def test_task3_metadata_dx_must_agree(tmp_path):
    make_task3(tmp_path, {"ISIC_0024306": "NV"})
    meta = tmp_path / "HAM10000_metadata.csv"
    meta.write_text(meta.read_text().replace(",nv,", ",mel,"))
    with pytest.raises(DataError, match="contradicts NV"):
        ISICTask3Reader(tmp_path).read()


def test_diagnosis_csv_labels_and_combine(tmp_path):
    make_task1(tmp_path, ["ISIC_0000001", "ISIC_0000002"])
    csv_path = tmp_path / "diag.csv"
    csv_path.write_text("image,label,label_native\nISIC_0000001,MEL,melanoma\nISIC_0009999,NV,nevus\n")
    reader = DiagnosisCSVReader(csv_path)
    assert reader.read_labels() == {"ISIC_0000001": "MEL", "ISIC_0009999": "NV"}
    records, used = apply_labels(ISICTask1Reader(tmp_path).read(), reader.read_labels(), "diagnosis_csv")
    assert used == 1
    assert (records[0].label, records[0].source) == ("MEL", "isic_task1+diagnosis_csv")
    assert records[0].mask is not None
    assert records[1].label is None
    with_images = DiagnosisCSVReader(csv_path, images=tmp_path / "ISIC2018_Task1-2_Training_Input").read()
    merged = combine(ISICTask1Reader(tmp_path).read(), with_images)
    assert len(merged) == 3  # ISIC_0009999 has no file: validation reports it
    one = next(r for r in merged if r.id == "ISIC_0000001")
    assert (one.label, one.mask is not None) == ("MEL", True)


def test_combine_conflicts(tmp_path):
    a = save(tmp_path / "a" / "ISIC_1.jpg", rgb())
    b = save(tmp_path / "b" / "ISIC_1.jpg", rgb(seed=3))
    copy = tmp_path / "c" / "ISIC_1.jpg"
    copy.parent.mkdir()
    copy.write_bytes(a.read_bytes())
    merged = combine([Record(image=a, label="MEL", source="x")], [Record(image=copy, lesion_id="L1", source="y")])
    assert merged == [Record(image=a, label="MEL", lesion_id="L1", source="x+y")]
    with pytest.raises(DataError, match="duplicate image id ISIC_1: different files"):
        combine([Record(image=a)], [Record(image=b)])
    with pytest.raises(DataError, match="labelled MEL by x but NV by y"):
        combine([Record(image=a, label="MEL", source="x")], [Record(image=a, label="NV", source="y")])
    with pytest.raises(DataError, match="labelled MEL"):
        apply_labels([Record(image=a, label="MEL", source="x")], {"ISIC_1": "NV"}, "diag")


def _make_ph2(root: Path) -> None:
    images = root / "PH2 Dataset images"
    for k, name in enumerate(["IMD002", "IMD003", "IMD058"]):
        save(images / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp", rgb(30, 20, k))
        save(images / name / f"{name}_lesion" / f"{name}_lesion.bmp", disk(30, 20))
        (images / name / f"{name}_roi").mkdir()
    (root / "PH2_dataset.csv").write_text(
        "Name,Clinical Diagnosis,Asymmetry\nIMD003,0,0\nIMD002,1,1\nIMD058,2,0\n,,\n0 - Co,,\n"
    )


def test_ph2(tmp_path):
    _make_ph2(tmp_path)
    records = create_reader("ph2", tmp_path).read()
    assert [(r.id, r.label) for r in records] == [("IMD002", "NV"), ("IMD003", "NV"), ("IMD058", "MEL")]
    assert records[0].mask.name == "IMD002_lesion.bmp"
    assert all(r.source == "ph2" for r in records)
    unlabelled = PH2Reader(tmp_path, diagnosis=None).read()
    assert all(r.label is None for r in unlabelled)
    (tmp_path / "PH2_dataset.csv").write_text("Image Name,Clinical Diagnosis\nIMD003,7\n")
    with pytest.raises(DataError, match="unknown Clinical Diagnosis '7'"):
        PH2Reader(tmp_path).read()


def test_manifest(tmp_path):
    save(tmp_path / "images" / "a.jpg", rgb())
    save(tmp_path / "masks" / "a_m.png", disk())
    save(tmp_path / "images" / "b.jpg", rgb())
    csv_path = tmp_path / "manifest.csv"
    csv_path.write_text(
        "image,mask,label,lesion_id,age,sex,site,split,extra\n"
        "images/a.jpg,masks/a_m.png,MEL,L1,55,male,back,test,x\n"
        "images/b.jpg,,,,,unknown,,,y\n"
    )
    a, b = ManifestReader(csv_path, label_map={"MEL": "SCC"}).read()
    assert a.image == (tmp_path / "images" / "a.jpg").resolve()
    assert a.mask == (tmp_path / "masks" / "a_m.png").resolve()
    assert (a.label, a.lesion_id, a.meta) == (
        "SCC",
        "L1",
        {"age": 55.0, "sex": "male", "site": "back", "split": "test"},
    )
    assert (b.mask, b.label, b.lesion_id, b.meta) == (None, None, None, {})
    csv_path.write_text("image,split\nimages/a.jpg,holdout\n")
    with pytest.raises(DataError, match="line 2: split must be"):
        ManifestReader(csv_path).read()


def test_real_isic2018(shared_data):
    root = shared_data / "isic2018"
    counts = pool_counts(root)
    assert counts["task3"] == counts["task3_images"] > 0  # the CSV and the folder agree
    task1 = create_reader("isic_task1", root).read()
    assert len(task1) == counts["task1"]
    assert all(r.mask is not None and r.mask.is_file() for r in task1)
    task3 = create_reader("isic_task3", root).read()
    assert len(task3) == counts["task3"]
    assert all(r.label is not None and r.lesion_id for r in task3)
    assert Counter(r.label for r in task3) == counts["task3_per_class"]
    assert all(n > 0 for n in counts["task3_per_class"].values())  # all 7 classes, DF included since 2026-11-30
    assert sum(r.mask is not None for r in task3) == counts["task3_masks"]
    labels = DiagnosisCSVReader(root / "ISIC2018_Task1_Training_Diagnosis.csv").read_labels()
    labelled, used = apply_labels(task1, labels)
    assert used == len(labels) == counts["task1_diagnosed"]
    merged = combine(labelled, task3)
    assert len(merged) == counts["task1"] + counts["task3"]


def test_real_manifest(shared_data):
    records = create_reader("manifest", shared_data / "isic-sample" / "manifest.csv").read()
    assert len(records) == 124
    assert sum(r.mask is not None for r in records) == 61
    assert all(r.image.is_file() for r in records)
