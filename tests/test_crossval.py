"""skinfusion crossval: the folds of each seed pooled into one score of every lesion, both ways."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from imgutil import rgb, save

from skinfusion.errors import DataError
from skinfusion.evaluation.crossval import crossval_main, pool_crossval

CLASSES = ["MEL", "NV"]


def _manifest(root: Path) -> Path:
    """Six labelled images: lesions A (2 images, MEL), B (MEL), C (NV), D (NV), E (NV); sources given."""
    rows = ["id,image,label,lesion_id,split,source"]
    spec = [("MEL", "A", "isic_task3"), ("MEL", "A", "isic_task3"), ("MEL", "B", "isic_task1")]
    spec += [("NV", "C", "isic_task1"), ("NV", "D", "isic_task3"), ("NV", "E", "isic_task3")]
    for i, (label, lesion, source) in enumerate(spec):
        save(root / f"ISIC_{i:07d}.png", rgb(8, 8, seed=i))
        rows.append(f"ISIC_{i:07d},ISIC_{i:07d}.png,{label},{lesion},train,{source}")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root / "manifest.csv"


def _fold(folder: Path, fold: int, predicted: dict[int, str], blind: dict[int, str], jaccard: dict[int, float]):
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(json.dumps({"cv": {"folds": 2, "fold": fold, "seed": 0}}))
    for sub, labels in (("predictions", predicted), ("image_only", blind)):
        if not labels:
            continue
        (folder / sub).mkdir()
        lines = ["image,MEL,NV"] + [
            f"ISIC_{i:07d},{0.9 if c == 'MEL' else 0.1},{0.1 if c == 'MEL' else 0.9}" for i, c in labels.items()
        ]
        (folder / sub / "predictions.csv").write_text("\n".join(lines) + "\n")
    rows = ["id,threshold_jaccard"] + [f"ISIC_{i:07d},{j}" for i, j in jaccard.items()]
    (folder / "per_image_segmentation.csv").write_text("\n".join(rows) + "\n")
    return folder


def _two_seeds(tmp_path: Path) -> list[list[Path]]:
    """Seed 0: with metadata every image right; image only images 0 and 1 (lesion A, MEL) wrong.
    Seed 1: with metadata images 1 (lesion A) and 4 (lesion D, NV) wrong; image only every image "NV"."""
    right = {0: "MEL", 1: "MEL", 2: "MEL", 3: "NV", 4: "NV", 5: "NV"}
    s0 = [
        _fold(
            tmp_path / "s0/f0",
            0,
            {i: right[i] for i in (0, 1, 3)},
            {0: "NV", 1: "NV", 3: "NV"},
            {0: 1.0, 1: 0.8, 3: 0.0},
        ),
        _fold(
            tmp_path / "s0/f1",
            1,
            {i: right[i] for i in (2, 4, 5)},
            {2: "MEL", 4: "NV", 5: "NV"},
            {2: 0.7, 4: 0.9, 5: 0.6},
        ),
    ]
    s1 = [
        _fold(
            tmp_path / "s1/f0", 0, {0: "MEL", 1: "NV", 3: "NV"}, {0: "NV", 1: "NV", 3: "NV"}, {0: 1.0, 1: 1.0, 3: 1.0}
        ),
        _fold(
            tmp_path / "s1/f1", 1, {2: "MEL", 4: "MEL", 5: "NV"}, {2: "NV", 4: "NV", 5: "NV"}, {2: 1.0, 4: 1.0, 5: 1.0}
        ),
    ]
    return [s0, s1]


def test_pooled_folds_are_scored_per_seed_with_support(tmp_path):
    """By hand. Seed 0: with metadata every image right (1.0); image only MEL 1/3, NV 3/3 -> 2/3.
    Seed 1: with metadata MEL 2/3, NV 2/3 -> 2/3; image only MEL 0, NV 1 -> 1/2. Jaccard: Task 1 images 2 and 3."""
    manifest = _manifest(tmp_path)
    report = pool_crossval(manifest, _two_seeds(tmp_path), tmp_path / "out", n_resamples=200)
    m = report["metrics"]
    assert m["with_metadata/balanced_accuracy"]["per_seed"] == pytest.approx([1.0, 2 / 3])
    assert m["image_only/balanced_accuracy"]["per_seed"] == pytest.approx([2 / 3, 1 / 2])
    assert m["image_only/balanced_accuracy"]["mean"] == pytest.approx(7 / 12)
    low, high = m["image_only/balanced_accuracy"]["interval"]
    assert low <= 7 / 12 <= high
    assert m["image_only/recall/MEL"]["per_seed"] == pytest.approx([1 / 3, 0.0])
    assert report["support"] == {"MEL": {"images": 3, "lesions": 2}, "NV": {"images": 3, "lesions": 3}}
    assert m["task1_threshold_jaccard"]["per_seed"] == pytest.approx([0.35, 1.0])
    assert m["task1_threshold_jaccard"]["num_images"] == 2
    assert m["threshold_jaccard"]["per_seed"] == pytest.approx([4.0 / 6, 1.0])
    text = (tmp_path / "out" / "crossval.md").read_text()
    assert "| MEL | 3 | 2 |" in text
    assert json.loads((tmp_path / "out" / "crossval.json").read_text())["runs"] == 2


def test_per_lesion_and_one_source_score_as_a_check_with_one_image_per_lesion(tmp_path):
    """By hand. Per lesion (A = mean of images 0 and 1), seed 0 image only: MEL A 0, B 1 -> 1/2, NV 1 -> 3/4;
    seed 1 with metadata: MEL A 1/2, B 1 -> 3/4, NV C 1, D 0, E 1 -> 2/3 -> 17/24 (per image: 2/3).
    Source isic_task3 (images 0, 1, 4, 5), per image: seed 0 image only MEL 0, NV 1 -> 1/2; seed 1 with metadata
    MEL 1/2, NV 1/2 -> 1/2; Jaccard of those images, seed 0: (1.0 + 0.8 + 0.9 + 0.6) / 4. Both: lesions A, D, E."""
    manifest = _manifest(tmp_path)
    runs = _two_seeds(tmp_path)
    m = pool_crossval(manifest, runs, tmp_path / "lesion", n_resamples=200, per_lesion=True)["metrics"]
    assert m["with_metadata/balanced_accuracy"]["per_seed"] == pytest.approx([1.0, 17 / 24])
    assert m["image_only/balanced_accuracy"]["per_seed"] == pytest.approx([3 / 4, 1 / 2])
    assert m["with_metadata/recall/MEL"]["per_seed"] == pytest.approx([1.0, 3 / 4])
    assert m["threshold_jaccard"]["per_seed"] == pytest.approx([4.0 / 6, 1.0])  # masks stay per image
    assert "each of the 5 lesions once" in (tmp_path / "lesion" / "crossval.md").read_text()

    report = pool_crossval(manifest, runs, tmp_path / "ham", n_resamples=200, source="isic_task3")
    m = report["metrics"]
    assert report["num_images"] == 4
    assert report["support"] == {"MEL": {"images": 2, "lesions": 1}, "NV": {"images": 2, "lesions": 2}}
    assert m["image_only/balanced_accuracy"]["per_seed"] == pytest.approx([1 / 2, 1 / 2])
    assert m["with_metadata/balanced_accuracy"]["per_seed"] == pytest.approx([1.0, 1 / 2])
    assert m["threshold_jaccard"]["per_seed"] == pytest.approx([0.825, 1.0])
    assert "task1_threshold_jaccard" not in m
    assert "source `isic_task3`" in (tmp_path / "ham" / "crossval.md").read_text()

    argv = ["--truth", str(manifest), "--out", str(tmp_path / "both"), "--per-lesion", "--source", "isic_task3"]
    report = crossval_main([*argv, "--run", *map(str, runs[0]), "--run", *map(str, runs[1]), "--resamples", "100"])
    assert report["num_lesions"] == 3
    assert report["metrics"]["with_metadata/balanced_accuracy"]["per_seed"] == pytest.approx([1.0, 1 / 2])
    assert report["metrics"]["image_only/balanced_accuracy"]["per_seed"] == pytest.approx([1 / 2, 1 / 2])


def test_per_lesion_and_source_refuse_what_they_cannot_score(tmp_path):
    manifest = _manifest(tmp_path)
    runs = _two_seeds(tmp_path)
    with pytest.raises(DataError, match="no scored image with a diagnosis has source 'ph2'"):
        pool_crossval(manifest, runs, source="ph2")
    text = manifest.read_text()
    manifest.write_text(text.replace("ISIC_0000003.png,NV,C", "ISIC_0000003.png,NV,A"))  # lesion A: MEL and NV
    with pytest.raises(DataError, match="lesion 'A' has images of two diagnoses"):
        pool_crossval(manifest, runs, per_lesion=True)
    plain = tmp_path / "plain.csv"
    plain.write_text("\n".join(",".join(row.split(",")[:5]) for row in text.splitlines()) + "\n")
    with pytest.raises(DataError, match="no 'source' column"):
        pool_crossval(plain, runs, source="isic_task3")


def test_crossval_refuses_missing_or_repeated_folds(tmp_path, capsys):
    manifest = _manifest(tmp_path)
    f0 = _fold(tmp_path / "f0", 0, {0: "MEL", 1: "MEL", 3: "NV"}, {}, {})
    f1 = _fold(tmp_path / "f1", 1, {2: "MEL", 4: "NV", 5: "NV"}, {}, {})
    again = _fold(tmp_path / "again", 1, {1: "MEL", 4: "NV", 5: "NV"}, {}, {})
    with pytest.raises(DataError, match="each of the 2 folds"):
        pool_crossval(manifest, [[f0]])
    with pytest.raises(DataError, match="two folds"):
        pool_crossval(manifest, [[f0, again]])
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "metrics.json").write_text("{}")
    with pytest.raises(DataError, match="no cross-validation fold"):
        pool_crossval(manifest, [[tmp_path / "plain", f1]])
    report = crossval_main(["--truth", str(manifest), "--run", str(f0), str(f1), "--out", str(tmp_path / "o")])
    assert report["metrics"]["with_metadata/balanced_accuracy"]["per_seed"] == [1.0]
    assert "balanced accuracy, with the metadata" in capsys.readouterr().out


def test_mask_only_images_are_left_out_of_the_diagnosis_and_counted(tmp_path):
    """evaluate predicts a diagnosis for a mask-only image (no label in the manifest) with metadata but leaves it out
    of the image-only pass: the pool scores the labelled images only, says how many it left out, and refuses an
    image that the manifest does not hold."""
    manifest = _manifest(tmp_path)
    save(tmp_path / "ISIC_0000006.png", rgb(8, 8, seed=6))
    with open(manifest, "a") as f:
        f.write("ISIC_0000006,ISIC_0000006.png,,F,train,isic_task1\n")
    right = {0: "MEL", 1: "MEL", 2: "MEL", 3: "NV", 4: "NV", 5: "NV"}
    folds = [
        _fold(tmp_path / "f0", 0, {0: "MEL", 1: "MEL", 3: "NV", 6: "NV"}, {0: "MEL", 1: "MEL", 3: "NV"}, {0: 1.0}),
        _fold(tmp_path / "f1", 1, {i: right[i] for i in (2, 4, 5)}, {2: "NV", 4: "NV", 5: "NV"}, {2: 1.0}),
    ]
    report = pool_crossval(manifest, [folds], tmp_path / "out", n_resamples=100)
    assert report["num_images"] == 6
    assert report["without_diagnosis"] == 1
    assert report["metrics"]["with_metadata/balanced_accuracy"]["per_seed"] == pytest.approx([1.0])
    assert report["metrics"]["image_only/balanced_accuracy"]["per_seed"] == pytest.approx([(2 / 3 + 1) / 2])
    assert "1 scored images have no diagnosis" in (tmp_path / "out" / "crossval.md").read_text()

    stranger = tmp_path / "g0"
    _fold(stranger, 0, {0: "MEL", 1: "MEL", 3: "NV", 7: "NV"}, {}, {0: 1.0})
    with pytest.raises(DataError, match="not in this manifest: \\['ISIC_0000007'\\]"):
        pool_crossval(manifest, [[stranger, folds[1]]])
