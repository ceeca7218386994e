"""``prepare``: cache round trip, manifest contract, incremental re-runs, all-or-nothing failure."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import pool_counts
from imgutil import disk, make_task1, make_task3, rgb, save
from PIL import Image

from skinfusion.cli import main
from skinfusion.data.prepare import MANIFEST_COLUMNS, parse_source, prepare, prepare_main
from skinfusion.data.readers import ManifestReader
from skinfusion.errors import DataError

T1 = ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"]
T3 = {"ISIC_0024306": "NV", "ISIC_0024307": "NV", "ISIC_0024308": "MEL", "ISIC_0024309": "BKL"}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "isic"
    make_task1(root, T1, w=80, h=60)
    make_task3(root, T3, lesions={"ISIC_0024306": "HAM_1", "ISIC_0024307": "HAM_1"})
    (root / "diag.csv").write_text("image,label\nISIC_0000001,MEL\nISIC_0000002,NV\n")
    return root


def _sources(root):
    return [f"isic_task1:{root}", f"diagnosis_csv:{root / 'diag.csv'}", f"isic_task3:{root}"]


def _rows(out):
    with (out / "manifest.csv").open() as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def test_parse_source():
    s = parse_source("isic_task3:/data/x:masks=none,subset=Training,n=3")
    assert (s.kind, s.path, s.options) == ("isic_task3", "/data/x", {"masks": None, "subset": "Training", "n": 3})
    assert parse_source("manifest:/a/b.csv").options == {}
    with pytest.raises(ValueError, match="KIND:PATH"):
        parse_source("/just/a/path")


def test_round_trip(tree, tmp_path):
    out = tmp_path / "cache"
    report = prepare(_sources(tree), out, size=32, side="shortest", workers=1, progress=False)
    assert (report.records, report.accepted, report.decoded, report.reused) == (7, 7, 7, 0)
    assert report.rejected == []
    header = (out / "manifest.csv").read_text().splitlines()[0]
    assert tuple(header.split(",")) == MANIFEST_COLUMNS
    rows = _rows(out)
    assert set(rows) == set(T1) | set(T3)

    r = rows["ISIC_0000001"]
    assert (r["label"], r["source"], r["orig_width"], r["orig_height"]) == (
        "MEL",
        "isic_task1+diagnosis_csv",
        "80",
        "60",
    )
    assert r["image"] == "images/ISIC_0000001.jpg"
    assert r["orig_image"] == str((tree / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000001.jpg").resolve())
    image = np.asarray(Image.open(out / r["image"]))
    assert image.shape == (32, 43, 3)  # shorter side 60 -> 32, longer 80 * 32 / 60 = 42.7 -> 43
    mask = np.asarray(Image.open(out / r["mask"]))
    assert mask.shape == (32, 43)
    assert set(np.unique(mask)) == {0, 255}
    # The disk covers the middle: the cached mask agrees with the original downscaled.
    assert mask[16, 21] == 255
    assert mask[0, 0] == 0
    original = np.asarray(Image.open(tree / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000001.jpg"))
    small = np.asarray(Image.fromarray(original).resize((43, 32), Image.BOX))
    assert np.abs(image.astype(int) - small.astype(int)).mean() < 4
    assert rows["ISIC_0000003"]["label"] == ""

    # 20x15 Task 3 JPEGs need no resizing: copied byte for byte.
    t3 = rows["ISIC_0024306"]
    assert (out / t3["image"]).read_bytes() == (
        tree / "ISIC2018_Task3_Training_Input" / "ISIC_0024306.jpg"
    ).read_bytes()
    assert report.copied == 4
    assert (t3["lesion_id"], t3["age"], t3["sex"], t3["site"]) == ("HAM_1", "40.0", "female", "back")
    assert rows["ISIC_0024306"]["split"] == rows["ISIC_0024307"]["split"]  # same lesion

    saved = json.loads((out / "report.json").read_text())
    assert saved["accepted"] == 7
    assert sum(saved["per_split"].values()) == 7
    assert saved["per_source"] == {"isic_task1": 1, "isic_task1+diagnosis_csv": 2, "isic_task3": 4}

    # The prepared manifest is itself a valid generic manifest.
    again = ManifestReader(out / "manifest.csv").read()
    assert {x.id for x in again} == set(rows)
    assert all(x.meta.get("split") in ("train", "val", "test") for x in again)


def test_incremental_rerun_does_no_work_and_redoes_changed(tree, tmp_path):
    out = tmp_path / "cache"
    prepare(_sources(tree), out, size=32, workers=1, progress=False)
    first = (out / "manifest.csv").read_text()
    report = prepare(_sources(tree), out, size=32, workers=1, progress=False)
    assert (report.decoded, report.reused) == (0, 7)
    assert (out / "manifest.csv").read_text() == first

    changed = tree / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000002.jpg"
    save(changed, rgb(80, 60, seed=42), quality=95)
    st = changed.stat()
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    report = prepare(_sources(tree), out, size=32, workers=1, progress=False)
    assert (report.decoded, report.reused) == (1, 6)
    cached = np.asarray(Image.open(out / "images" / "ISIC_0000002.jpg")).astype(int)
    expected = np.asarray(Image.fromarray(rgb(80, 60, seed=42)).resize((43, 32), Image.BOX)).astype(int)
    assert np.abs(cached - expected).mean() < 4

    # Different cache parameters invalidate everything.
    report = prepare(_sources(tree), out, size=16, workers=1, progress=False)
    assert (report.decoded, report.reused) == (7, 0)


def test_bad_files_fail_before_writing(tree, tmp_path):
    out = tmp_path / "cache"
    prepare(_sources(tree), out, size=32, workers=1, progress=False)
    manifest = (out / "manifest.csv").read_bytes()
    cached = (out / "images" / "ISIC_0000001.jpg").read_bytes()

    bad_image = tree / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000001.jpg"
    bad_image.write_bytes(bad_image.read_bytes()[:200])
    bad_mask = tree / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000003_segmentation.png"
    m = disk(80, 60)
    m[0, 0] = 7
    save(bad_mask, m)
    with pytest.raises(DataError, match="2 bad record") as info:
        prepare(_sources(tree), out, size=32, workers=1, progress=False)
    message = str(info.value)
    assert str(bad_image) in message
    assert "truncated" in message
    assert str(bad_mask) in message
    assert "not binary: values {0, 7, 255}" in message
    assert (out / "manifest.csv").read_bytes() == manifest
    assert (out / "images" / "ISIC_0000001.jpg").read_bytes() == cached
    assert not list(out.glob(".staging-*"))

    report = prepare(_sources(tree), out, size=32, workers=1, skip_bad=True, progress=False)
    assert report.accepted == 5
    assert {r["id"] for r in report.rejected} == {"ISIC_0000001", "ISIC_0000003"}
    assert "ISIC_0000001" not in _rows(out)
    assert not (out / "images" / "ISIC_0000001.jpg").exists()
    # Rejects are remembered too: a re-run decodes nothing.
    report = prepare(_sources(tree), out, size=32, workers=1, skip_bad=True, progress=False)
    assert (report.decoded, len(report.rejected)) == (0, 2)


def test_unknown_class_and_label_map(tree, tmp_path):
    (tree / "diag.csv").write_text("image,label\nISIC_0000001,XYZ\n")
    with pytest.raises(DataError, match="unknown class 'XYZ'"):
        prepare(_sources(tree), tmp_path / "c", size=32, workers=1, progress=False)
    report = prepare(
        _sources(tree),
        tmp_path / "c",
        size=32,
        workers=1,
        progress=False,
        label_map={"XYZ": "SCC", "MEL": "SCC"},
        class_names=["SCC", "NV", "BKL"],
    )
    assert report.accepted == 7
    assert _rows(tmp_path / "c")["ISIC_0024308"]["label"] == "SCC"


def test_manifest_split_column_is_kept(tmp_path):
    for i in range(6):
        save(tmp_path / "ds" / f"im{i}.png", rgb(20, 20, i))
    (tmp_path / "ds" / "m.csv").write_text(
        "image,label,lesion_id,split\n"
        + "".join(f"im{i}.png,NV,{'L' if i < 2 else ''},{'test' if i == 0 else ''}\n" for i in range(6))
    )
    prepare([f"manifest:{tmp_path / 'ds' / 'm.csv'}"], tmp_path / "c", size=None, workers=1, progress=False)
    rows = _rows(tmp_path / "c")
    assert rows["im0"]["split"] == rows["im1"]["split"] == "test"
    assert rows["im0"]["image"] == "images/im0.jpg"


def test_cli_and_workers(tree, tmp_path, capsys):
    out = tmp_path / "cache"
    argv = ["--out", str(out), "--size", "32", "--workers", "2", "--no-progress", "--seed", "1"]
    for s in _sources(tree):
        argv += ["--source", s]
    main(["prepare", *argv])
    printed = capsys.readouterr().out
    assert "7/7 records accepted, 0 rejected" in printed
    assert len(_rows(out)) == 7
    (tree / "diag.csv").write_text("image,label\nISIC_0000001,XYZ\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown class 'XYZ'" in err
    assert "Traceback" not in err


def test_synthetic_source_keeps_its_split(tmp_path):
    pytest.importorskip("skinfusion.data.synthetic")
    report = prepare([f"synthetic:{tmp_path / 'syn'}:n=12,seed=0,size=32"], tmp_path / "c", workers=1, progress=False)
    assert (report.accepted, report.rejected) == (12, [])
    with (tmp_path / "syn" / "manifest.csv").open() as f:
        given = {Path(r["image"]).stem: r["split"] for r in csv.DictReader(f)}
    assert {i: r["split"] for i, r in _rows(tmp_path / "c").items()} == given


@pytest.mark.real_data
def test_real_sample_manifest(tmp_path, shared_data):
    out = tmp_path / "cache"
    report = prepare([f"manifest:{shared_data / 'isic-sample' / 'manifest.csv'}"], out, workers=1, progress=False)
    assert (report.accepted, report.rejected) == (124, [])
    rows = list(_rows(out).values())
    assert sum(bool(r["mask"]) for r in rows) == 61
    splits_of: dict[str, set[str]] = {}
    for r in rows:
        if r["lesion_id"]:
            splits_of.setdefault(r["lesion_id"], set()).add(r["split"])
    assert all(len(s) == 1 for s in splits_of.values())
    ph2 = next(r for r in rows if r["id"].startswith("IMD"))
    assert ph2["image"].endswith(".jpg")
    assert int(ph2["orig_width"]) == 512


@pytest.mark.slow
@pytest.mark.real_data
def test_real_full_pool(tmp_path, shared_data):
    """The whole ISIC 2018 pool: no rejects, every class in the training split, no lesion leakage, a re-run
    decodes nothing."""
    root = shared_data / "isic2018"
    counts = pool_counts(root)
    total = counts["task1"] + counts["task3"]
    sources = [
        f"isic_task1:{root}",
        f"diagnosis_csv:{root / 'ISIC2018_Task1_Training_Diagnosis.csv'}",
        f"isic_task3:{root}",
    ]
    out = tmp_path / "cache"
    report = prepare(sources, out, workers=2, progress=False)
    assert (report.records, report.accepted, report.rejected) == (total, total, [])
    assert report.per_source == {
        "isic_task1": counts["task1"] - counts["task1_diagnosed"],
        "isic_task1+diagnosis_csv": counts["task1_diagnosed"],
        "isic_task3": counts["task3"],
    }
    rows = list(_rows(out).values())
    train_labels = {r["label"] for r in rows if r["split"] == "train" and r["label"]}
    assert train_labels == set(counts["task3_per_class"])  # all 7 classes, the rarest (DF) included
    splits_of: dict[str, set[str]] = {}
    for r in rows:
        if r["lesion_id"]:
            splits_of.setdefault(r["lesion_id"], set()).add(r["split"])
    assert len(splits_of) > 6000
    assert all(len(s) == 1 for s in splits_of.values())
    again = prepare(sources, out, workers=2, progress=False)
    assert (again.decoded, again.reused) == (0, total)


def test_process_pool_gives_the_same_cache_as_in_process(tree, tmp_path, monkeypatch):
    """Small jobs run in-process; forcing the pool must not change a byte of the manifest."""
    import skinfusion.data.prepare as prepare_module

    single = prepare(_sources(tree), tmp_path / "one", size=32, workers=1, progress=False)
    monkeypatch.setattr(prepare_module, "_MIN_TASKS_PER_WORKER", 0)
    pooled = prepare(_sources(tree), tmp_path / "two", size=32, workers=2, progress=False)
    assert (pooled.accepted, pooled.decoded) == (single.accepted, single.decoded) == (7, 7)
    assert (tmp_path / "one" / "manifest.csv").read_bytes() == (tmp_path / "two" / "manifest.csv").read_bytes()
    for name in ("images/ISIC_0000001.jpg", "masks/ISIC_0000001.png"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_cli_tunes_the_decoding_allocator(tree, tmp_path, monkeypatch):
    import skinfusion.data.prepare as prepare_module

    calls = []
    monkeypatch.setattr(prepare_module, "tune_malloc", lambda: calls.append(True) or True)
    argv = ["--out", str(tmp_path / "cache"), "--size", "32", "--workers", "1", "--no-progress"]
    for s in _sources(tree):
        argv += ["--source", s]
    prepare_main(argv)
    assert len(_rows(tmp_path / "cache")) == 7
    assert calls == [True]


def test_python_api_leaves_the_allocator_alone_by_default(tree, tmp_path, monkeypatch):
    import skinfusion.data.prepare as prepare_module

    calls = []
    monkeypatch.setattr(prepare_module, "tune_malloc", lambda: calls.append(True) or True)
    prepare(_sources(tree), tmp_path / "cache", size=32, workers=1, progress=False)
    assert calls == []
