"""skinfusion.evaluation.report: metrics.json, per-class table, plots and worst-segmentation gallery."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from imgutil import disk, rgb, save
from modelutil import make_module, save_ckpt
from PIL import Image

from skinfusion.data.records import ISIC_CLASSES
from skinfusion.errors import DataError
from skinfusion.evaluation.report import evaluate, evaluate_main
from skinfusion.inference.predictor import Predictor


def half_mask(w: int, h: int, cols: int) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[:, :cols] = 255
    return mask


@pytest.fixture
def hand_case(tmp_path) -> tuple[Path, Path]:
    """Four images: A mask+label, B mask only, C and D label only; predictions with known scores.

    Task 1 (20x10 truth = left 10 columns): A predicted exactly (J=1, Dice 1); B predicted as the
    left 5 columns (TP 50, FN 50: J=0.5 -> thresholded 0, Dice 2*50/150). Task 3 (classes MEL, NV,
    BCC): A=MEL predicted MEL, C=NV predicted NV, D=NV predicted MEL -> recalls MEL 1, NV 1/2,
    balanced accuracy 0.75 (BCC absent from the truth: left out).
    """
    data = tmp_path / "data"
    for name in "ABCD":
        save(data / f"ISIC_000000{'ABCD'.index(name)}.png", rgb(20, 10, seed=ord(name)))
    save(data / "ISIC_0000000_segmentation.png", half_mask(20, 10, 10))
    save(data / "ISIC_0000001_segmentation.png", half_mask(20, 10, 10))
    (data / "manifest.csv").write_text(
        "image,mask,label\n"
        "ISIC_0000000.png,ISIC_0000000_segmentation.png,MEL\n"
        "ISIC_0000001.png,ISIC_0000001_segmentation.png,\n"
        "ISIC_0000002.png,,NV\n"
        "ISIC_0000003.png,,NV\n"
    )
    pred = tmp_path / "pred"
    save(pred / "masks" / "ISIC_0000000_segmentation.png", half_mask(20, 10, 10))
    save(pred / "masks" / "ISIC_0000001_segmentation.png", half_mask(20, 10, 5))
    (pred / "predictions.csv").write_text(
        "image,MEL,NV,BCC\n"
        "ISIC_0000000,0.7,0.2,0.1\n"
        "ISIC_0000001,0.2,0.2,0.6\n"
        "ISIC_0000002,0.1,0.8,0.1\n"
        "ISIC_0000003,0.6,0.3,0.1\n"
    )
    return data / "manifest.csv", pred


def test_hand_computed_report(tmp_path, hand_case):
    manifest, pred = hand_case
    report = evaluate(pred, manifest, tmp_path / "report", worst=5)

    assert report["task1/num_images"] == 2
    assert report["task1/jaccard"] == pytest.approx(0.75)
    assert report["task1/threshold_jaccard"] == pytest.approx(0.5)
    assert report["task1/dice"] == pytest.approx((1 + 2 / 3) / 2)
    assert report["task1/sensitivity"] == pytest.approx(0.75)
    assert report["task1/specificity"] == pytest.approx(1.0)
    assert report["task3/num_images"] == 3
    assert report["task3/balanced_accuracy"] == pytest.approx(0.75)
    assert report["task3/sensitivity/NV"] == pytest.approx(0.5)
    assert report["task3/auc/BCC"] is None  # absent class: NaN in the metrics, null in JSON
    assert report["confusion_matrix"] == {
        "class_names": ["MEL", "NV", "BCC"],
        "counts": [[1, 0, 0], [1, 1, 0], [0, 0, 0]],
    }
    # Argmax per class (the confusion matrix): MEL 1 of 1, NV 1 of 2; their mean is the balanced accuracy.
    assert report["task3/argmax/recall/MEL"] == pytest.approx(1.0)
    assert report["task3/argmax/recall/NV"] == pytest.approx(0.5)
    assert report["task3/argmax/recall/BCC"] is None
    assert report["task3/argmax/precision/MEL"] == pytest.approx(0.5)  # predicted twice, right once
    assert report["task3/argmax/precision/NV"] == pytest.approx(1.0)
    assert (report["task3/argmax/recall/MEL"] + report["task3/argmax/recall/NV"]) / 2 == pytest.approx(
        report["task3/balanced_accuracy"]
    )
    assert json.loads((tmp_path / "report" / "metrics.json").read_text()) == report

    table = (tmp_path / "report" / "per_class.md").read_text()
    for name, support in (("MEL", 1), ("NV", 2), ("BCC", 0)):
        assert table.count(f"| {name} | {support} |") == 2  # the argmax table and the thresholded one
    assert "### Argmax predictions" in table
    assert "### Thresholded one-vs-rest" in table
    assert "| MEL | 1 | 1.000 | 0.500 |" in table

    gallery = sorted((tmp_path / "report" / "worst_segmentations").iterdir())
    assert [p.name for p in gallery] == ["01_ISIC_0000001.png", "02_ISIC_0000000.png"]  # lowest Jaccard first
    for png in [*gallery, tmp_path / "report" / "confusion_matrix.png", tmp_path / "report" / "roc_curves.png"]:
        with Image.open(png) as image:
            image.load()
            assert image.width > 0
    rows = (tmp_path / "report" / "per_image_segmentation.csv").read_text().splitlines()
    assert rows[0].startswith("id,accuracy")
    assert len(rows) == 3


def test_report_with_predictor(tmp_path):
    data = tmp_path / "data"
    lines = ["image,mask,label"]
    for k in range(6):
        w, h = 40 + 10 * k, 60 - 5 * k
        save(data / f"ISIC_{k:07d}.jpg", rgb(w, h, seed=k), quality=95)
        mask = ""
        if k % 3 != 2:  # images 2 and 5 have no mask
            save(data / f"ISIC_{k:07d}_segmentation.png", disk(w, h))
            mask = f"ISIC_{k:07d}_segmentation.png"
        label = ISIC_CLASSES[k] if k != 0 else ""  # image 0 has no label
        lines.append(f"ISIC_{k:07d}.jpg,{mask},{label}")
    (data / "manifest.csv").write_text("\n".join(lines) + "\n")
    predictor = Predictor(save_ckpt(tmp_path / "m.ckpt", make_module()), progress=False)
    report = evaluate(predictor, data / "manifest.csv", tmp_path / "report", worst=3)

    assert report["task1/num_images"] == 4
    assert report["task3/num_images"] == 5
    for key in ("task1/threshold_jaccard", "task1/dice", "task3/balanced_accuracy", "task3/macro/auc"):
        assert key in report
    for name in ISIC_CLASSES:
        for metric in ("auc", "sensitivity", "specificity"):
            assert f"task3/{metric}/{name}" in report
    assert np.sum(report["confusion_matrix"]["counts"]) == 5
    table = (tmp_path / "report" / "per_class.md").read_text()
    assert all(f"| {name} |" in table for name in ISIC_CLASSES)
    assert len(list((tmp_path / "report" / "worst_segmentations").iterdir())) == 3
    # every image with some truth is predicted (6); only the 4 with a mask are scored for Task 1
    assert len(list((tmp_path / "report" / "predictions" / "masks").iterdir())) == 6


def test_mask_only_truth(tmp_path, hand_case):
    manifest, pred = hand_case
    (pred / "predictions.csv").unlink()
    only_masks = manifest.parent / "masks_only.csv"
    only_masks.write_text("image,mask\nISIC_0000000.png,ISIC_0000000_segmentation.png\n")
    report = evaluate(pred, only_masks, tmp_path / "report")
    assert report["task1/threshold_jaccard"] == 1.0
    assert not any(k.startswith("task3/") for k in report)
    assert not (tmp_path / "report" / "confusion_matrix.png").exists()
    with pytest.raises(DataError, match="no prediction CSV"):
        evaluate(pred, manifest, tmp_path / "report2")


def test_errors(tmp_path, hand_case):
    manifest, pred = hand_case
    (pred / "masks" / "ISIC_0000001_segmentation.png").unlink()
    with pytest.raises(DataError, match="no predicted mask for ISIC_0000001"):
        evaluate(pred, manifest, tmp_path / "r1")
    save(pred / "masks" / "ISIC_0000001_segmentation.png", half_mask(21, 10, 5))
    with pytest.raises(DataError, match="original image size"):
        evaluate(pred, manifest, tmp_path / "r2")
    save(pred / "masks" / "ISIC_0000001_segmentation.png", half_mask(20, 10, 5))
    manifest.write_text(manifest.read_text().replace(",NV\n", ",DF\n", 1))
    with pytest.raises(DataError, match="DF"):
        evaluate(pred, manifest, tmp_path / "r3")


def test_evaluate_main(tmp_path, hand_case, capsys):
    manifest, pred = hand_case
    report = evaluate_main(["--predictions", str(pred), "--truth", str(manifest), "--out", str(tmp_path / "r")])
    assert report["task3/balanced_accuracy"] == pytest.approx(0.75)
    assert "task1/threshold_jaccard" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        evaluate_main(["--truth", str(manifest), "--out", str(tmp_path / "r")])  # neither --predictions nor --ckpt


def test_evaluate_main_scores_the_test_split_by_default(tmp_path, hand_case, capsys):
    """A manifest with a split column: without --split only its test rows are scored; --split all scores all."""
    manifest, pred = hand_case
    lines = manifest.read_text().splitlines()
    splits = ["train", "test", "val", "test"]  # A train, B test (mask only), C val, D test (label only)
    rows = [f"{line},{split}" for line, split in zip(lines[1:], splits, strict=True)]
    manifest.write_text("\n".join([lines[0] + ",split", *rows]) + "\n")
    report = evaluate_main(["--predictions", str(pred), "--truth", str(manifest), "--out", str(tmp_path / "r")])
    assert report["task1/num_images"] == 1  # B
    assert report["task3/num_images"] == 1  # D
    captured = capsys.readouterr()
    assert "test split" in captured.err
    assert json.loads(captured.out)["split"] == "test"
    report = evaluate_main(
        ["--predictions", str(pred), "--truth", str(manifest), "--out", str(tmp_path / "all"), "--split", "all"]
    )
    assert (report["task1/num_images"], report["task3/num_images"]) == (2, 3)
    assert json.loads(capsys.readouterr().out)["split"] == "all"


@pytest.mark.real_data
def test_report_on_real_sample(tmp_path, shared_data):
    """The mixed real sample (masks only, labels only, both; JPEG and PH2 PNG) end to end."""
    predictor = Predictor(save_ckpt(tmp_path / "m.ckpt", make_module()), batch_size=32, progress=False)
    report = evaluate(predictor, shared_data / "isic-sample" / "manifest.csv", tmp_path / "report", worst=4)
    assert report["task1/num_images"] == 61
    assert report["task3/num_images"] == 124
    assert len(list((tmp_path / "report" / "worst_segmentations").iterdir())) == 4


def test_evaluate_scores_the_diagnosis_with_and_without_metadata(tmp_path):
    """A network with a metadata branch is scored twice: with the truth's age/sex/site (task3/*) and with them
    withheld (task3_image_only/*, image_only/predictions.csv): the image-only CSV is what the predictor gives for
    the same records stripped of their metadata, and the metadata changes the outputs."""
    import csv as csv_module
    import dataclasses

    from skinfusion.data.dataset import META_DIM, META_FIELDS
    from skinfusion.data.synthetic import write_synthetic
    from skinfusion.evaluation.isic import read_classification_csv
    from skinfusion.inference.inputs import collect_records

    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module(seed=3, meta_dim=META_DIM))
    write_synthetic(tmp_path / "syn", n=12, seed=1, size=48)
    manifest = tmp_path / "syn" / "manifest.csv"
    report = evaluate(Predictor(ckpt, progress=False), manifest, tmp_path / "report", split="all", worst=0)
    labelled = [r for r in collect_records(manifest) if r.label]
    assert report["task3_image_only/num_images"] == report["task3/num_images"] == len(labelled)
    assert report["task3/num_with_metadata"] == sum(1 for r in labelled if r.meta.get("age") not in (None, ""))
    assert report["task3/num_with_metadata"] > 0
    names = list(ISIC_CLASSES)
    ids, blind = read_classification_csv(tmp_path / "report" / "image_only" / "predictions.csv", names)
    _, seen = read_classification_csv(tmp_path / "report" / "predictions" / "predictions.csv", names)
    stripped = [
        dataclasses.replace(r, mask=None, meta={k: v for k, v in r.meta.items() if k not in META_FIELDS})
        for r in labelled
    ]
    expected = {p.id: p.probabilities for p in Predictor(ckpt, progress=False).predict_records(stripped)}
    np.testing.assert_allclose(blind, np.stack([expected[i] for i in ids]), atol=1e-5)
    assert not np.allclose(blind, seen, atol=1e-4)  # the metadata branch is read
    truth = np.array([names.index({r.id: r.label for r in labelled}[i]) for i in ids])
    recalls = [np.mean(blind[truth == k].argmax(1) == k) for k in range(len(names)) if (truth == k).any()]
    assert report["task3_image_only/balanced_accuracy"] == pytest.approx(np.mean(recalls))
    text = (tmp_path / "report" / "per_class.md").read_text()
    assert "diagnosis from the image alone" in text
    with open(tmp_path / "report" / "image_only" / "predictions.csv") as f:
        assert len(list(csv_module.reader(f))) == len(labelled) + 1


def test_evaluate_of_a_network_without_metadata_scores_one_way(tmp_path):
    from skinfusion.data.synthetic import write_synthetic

    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module(seed=3))
    write_synthetic(tmp_path / "syn", n=8, seed=1, size=48)
    report = evaluate(Predictor(ckpt, progress=False), tmp_path / "syn" / "manifest.csv", tmp_path / "r", worst=0)
    assert "task3/balanced_accuracy" in report
    assert not any(k.startswith("task3_image_only/") for k in report)
    assert not (tmp_path / "r" / "image_only").exists()


def test_evaluate_cv_folds_score_each_train_and_val_image_once(tmp_path):
    """--cv-folds K --cv-fold k scores fit's validation fold k: over k the folds partition the train and val rows
    (lesions kept together by assign_folds), never the test split."""
    from skinfusion.data import SkinFusionDataModule
    from skinfusion.data.synthetic import write_synthetic
    from skinfusion.evaluation.isic import read_classification_csv
    from skinfusion.inference.inputs import collect_records

    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module(seed=3))
    write_synthetic(tmp_path / "syn", n=24, seed=1, size=48)
    manifest = tmp_path / "syn" / "manifest.csv"
    records = collect_records(manifest)
    pool = sorted(r.id for r in records if r.label and r.meta["split"] in ("train", "val"))
    seen: list[str] = []
    for fold in range(3):
        out = tmp_path / f"fold{fold}"
        argv = ["--ckpt", str(ckpt), "--truth", str(manifest), "--out", str(out), "--worst", "0", "--no-progress"]
        evaluate_main([*argv, "--cv-folds", "3", "--cv-fold", str(fold)])
        ids, _ = read_classification_csv(out / "predictions" / "predictions.csv", list(ISIC_CLASSES))
        seen += list(ids)
        fit_fold = SkinFusionDataModule(manifest=str(manifest), cv_folds=3, cv_fold=fold).records("val")
        assert sorted(ids) == sorted(r.id for r in fit_fold if r.label)  # the fold fit validated on
    assert sorted(seen) == pool
    with pytest.raises(SystemExit):
        evaluate_main(
            [
                "--ckpt",
                str(ckpt),
                "--truth",
                str(manifest),
                "--out",
                str(tmp_path / "x"),
                "--cv-folds",
                "3",
                "--split",
                "val",
            ]
        )
