"""skinfusion.inference: masks at the original size the official scorer accepts, the Task 3 CSV, overlays, JSON."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from imgutil import disk, make_task1, rgb, save
from modelutil import ATTENTION_NAMES, ColourNet, make_module, save_ckpt
from PIL import Image

from skinfusion.data.records import ISIC_CLASSES, Record
from skinfusion.errors import DataError
from skinfusion.evaluation.isic import score_classification_csvs, score_segmentation_folders
from skinfusion.inference.inputs import collect_records
from skinfusion.inference.overlay import heatmap
from skinfusion.inference.postprocess import PostProcess
from skinfusion.inference.predictor import Predictor, predict_main

# (name, upright width, upright height, how it is stored)
IMAGES = [
    ("ISIC_0000001.jpg", 100, 80, "jpeg"),
    ("ISIC_0000002.png", 64, 128, "png"),
    ("ISIC_0000003.jpg", 60, 90, "exif6"),  # stored 90x60, EXIF orientation 6 (rotate 90 clockwise)
    ("ISIC_0000004.png", 50, 50, "grey"),
    ("ISIC_0000005.png", 70, 40, "rgba"),
    ("ISIC_0000006.bmp", 33, 47, "bmp"),
    ("ISIC_0000007.jpg", 200, 150, "jpeg"),
]


def save_exif_rotated(path: Path, upright: np.ndarray) -> Path:
    """Store ``upright`` rotated 90 degrees counter-clockwise, tagged orientation 6 (viewers rotate it back)."""
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, exif=exif, quality=95)
    return path


def write_images(folder: Path) -> dict[str, tuple[int, int]]:
    """The IMAGES, returning ``{id: upright (width, height)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for k, (name, w, h, kind) in enumerate(IMAGES):
        image = rgb(w, h, seed=k)
        if kind == "exif6":
            save_exif_rotated(folder / name, image)
            assert Image.open(folder / name).size == (h, w)  # stored sideways
        elif kind == "grey":
            save(folder / name, image[..., 0])
        elif kind == "rgba":
            save(folder / name, np.dstack([image, np.full((h, w), 200, np.uint8)]))
        else:
            save(folder / name, image, **({"quality": 95} if kind == "jpeg" else {}))
        sizes[Path(name).stem] = (w, h)
    return sizes


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_ckpt(tmp_path / "model.ckpt", make_module())


def test_outputs_accepted_by_official_scorer(tmp_path, ckpt):
    from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
    from isic_challenge_scoring.segmentation import SegmentationScore

    sizes = write_images(tmp_path / "images")
    predictor = Predictor(ckpt, batch_size=3, progress=False)
    assert predictor.image_size == 64  # from the checkpoint's inference record
    summary = predictor.write(predictor.predict_paths(tmp_path / "images"), tmp_path / "out")
    assert summary["num_images"] == len(IMAGES)

    masks = tmp_path / "out" / "masks"
    assert sorted(p.name for p in masks.iterdir()) == sorted(f"{i}_segmentation.png" for i in sizes)
    for image_id, size in sizes.items():
        with Image.open(masks / f"{image_id}_segmentation.png") as mask:
            assert mask.mode == "L"
            assert mask.size == size  # the upright original size, EXIF-rotated one included
            assert set(np.unique(np.asarray(mask))) <= {0, 255}

    table = (tmp_path / "out" / "predictions.csv").read_text().splitlines()
    assert table[0] == "image," + ",".join(ISIC_CLASSES)
    assert [row.split(",")[0] for row in table[1:]] == list(sizes)
    for row in table[1:]:
        values = [float(v) for v in row.split(",")[1:]]
        assert all(0.0 <= v <= 1.0 for v in values)
        assert sum(values) == pytest.approx(1.0, abs=1e-6)

    # Truth for the official scorer: a disk per image, and one label per class (it needs every class present).
    truth_dir = tmp_path / "truth"
    for image_id, (w, h) in sizes.items():
        save(truth_dir / f"{image_id}_segmentation.png", disk(w, h))
    lines = ["image," + ",".join(ISIC_CLASSES)]
    for k, image_id in enumerate(sizes):
        lines.append(image_id + "," + ",".join("1.0" if j == k else "0.0" for j in range(len(ISIC_CLASSES))))
    truth_csv = tmp_path / "truth.csv"
    truth_csv.write_text("\n".join(lines) + "\n")

    official = SegmentationScore.from_dir(truth_dir, masks)
    ours = score_segmentation_folders(masks, truth_dir)
    for metric, value in official.macro_average.items():
        assert ours[metric] == pytest.approx(value, abs=1e-12)
    official_cls = ClassificationScore.from_file(
        truth_csv, tmp_path / "out" / "predictions.csv", ClassificationMetric.BALANCED_ACCURACY
    )
    ours_cls = score_classification_csvs(tmp_path / "out" / "predictions.csv", truth_csv)
    assert ours_cls["balanced_accuracy"] == pytest.approx(official_cls.overall, abs=1e-12)


def test_inference_settings_travel_with_the_checkpoint(tmp_path, tiny_net):
    """A trained checkpoint records the DataModule's input size and normalisation, which predict and export use;
    a checkpoint written before the record existed is read from its parts."""
    import pytorch_lightning as pl
    import torch
    from safetensors import safe_open

    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.inference.export import export_main
    from skinfusion.training.module import SkinFusionModule

    data = SkinFusionDataModule(
        synthetic_samples=16, synthetic_size=32, image_size=48, normalization="unit", batch_size=4, num_workers=0
    )
    module = SkinFusionModule(tiny_net(), class_names=list(ISIC_CLASSES))
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_progress_bar=False)
    trainer.fit(module, data)
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    predictor = Predictor(tmp_path / "trained.ckpt", progress=False)
    assert (predictor.image_size, predictor.normalization) == (48, "unit")
    export_main(["--ckpt", str(tmp_path / "trained.ckpt"), "--format", "safetensors", "--out", str(tmp_path / "m.st")])
    with safe_open(str(tmp_path / "m.st"), framework="pt") as handle:
        assert json.loads(handle.metadata()["image_size"]) == 48
        assert json.loads(handle.metadata()["normalization"]) == "unit"

    ckpt = torch.load(tmp_path / "trained.ckpt", weights_only=True)
    record = ckpt["hyper_parameters"].pop("inference")
    ckpt["hyper_parameters"].update(net_config=record["net_config"], classes=record["class_names"])
    ckpt["datamodule_hyper_parameters"] = {"image_size": 40, "normalization": "unit"}
    torch.save(ckpt, tmp_path / "old.ckpt")
    old = Predictor(tmp_path / "old.ckpt", progress=False)
    assert (old.image_size, old.normalization, list(old.class_names)) == (40, "unit", list(ISIC_CLASSES))


def test_mask_follows_the_upright_image_at_original_size(tmp_path):
    """A colour-keyed stand-in network: the lesion is the red part of the *upright* image."""
    upright = np.zeros((90, 60, 3), np.uint8)
    upright[:45] = (255, 0, 0)  # top half red
    upright[45:] = (0, 0, 255)
    (tmp_path / "in").mkdir()
    save_exif_rotated(tmp_path / "in" / "ISIC_0000010.jpg", upright)
    wide = np.zeros((80, 100, 3), np.uint8)
    wide[:, :50] = (255, 0, 0)  # left half red
    wide[:, 50:] = (0, 0, 255)
    save(tmp_path / "in" / "ISIC_0000011.png", wide)

    predictor = Predictor(ColourNet(), image_size=64, normalization="unit", progress=False)
    results = {r.id: r for r in predictor.predict_paths(tmp_path / "in")}
    tall = results["ISIC_0000010"].mask
    assert tall.shape == (90, 60)
    assert tall[:40].all()
    assert not tall[50:].any()
    side = results["ISIC_0000011"].mask
    assert side.shape == (80, 100)
    assert side[:, :45].all()
    assert not side[:, 55:].any()


def test_temperature_and_probabilities(tmp_path):
    save(tmp_path / "a.png", rgb(30, 20))
    logits = np.array([2.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0])
    for temperature in (1.0, 2.5):
        predictor = Predictor(ColourNet(tuple(logits)), image_size=32, temperature=temperature, progress=False)
        (result,) = predictor.predict_paths(tmp_path / "a.png")
        expected = np.exp(logits / temperature) / np.exp(logits / temperature).sum()
        np.testing.assert_allclose(result.probabilities, expected, rtol=1e-5)
        assert result.predicted_class == "MEL"
        assert [name for name, _ in result.top_k(3)] == ["MEL", "NV", "BCC"]


def test_tta_inverts_every_view(tmp_path):
    """A pixel-wise network is flip/rotation equivariant: TTA must give the very same mask."""
    image = np.zeros((40, 70, 3), np.uint8)
    image[5:25, 10:40] = (255, 0, 0)
    image[image[..., 0] == 0] = (0, 0, 255)
    save(tmp_path / "x.png", image)
    plain = next(
        Predictor(ColourNet(), image_size=32, normalization="unit", progress=False).predict_paths(tmp_path / "x.png")
    )
    tta = next(
        Predictor(ColourNet(), image_size=32, normalization="unit", rot90=True, progress=False).predict_paths(
            tmp_path / "x.png"
        )
    )
    np.testing.assert_allclose(tta.mask_prob, plain.mask_prob, atol=1e-6)
    np.testing.assert_array_equal(tta.mask, plain.mask)


def test_overlays_and_json(tmp_path, ckpt):
    sizes = write_images(tmp_path / "images")
    predictor = Predictor(ckpt, progress=False)
    predictor.write(predictor.predict_paths(tmp_path / "images"), tmp_path / "out", overlays=True, json=True)
    for image_id, (w, h) in sizes.items():
        with Image.open(tmp_path / "out" / "overlays" / f"{image_id}_overlay.png") as overlay:
            assert overlay.mode == "RGB"
            assert overlay.width == w
            assert overlay.height > h  # the text strip below the image
        doc = json.loads((tmp_path / "out" / "json" / f"{image_id}.json").read_text())
        assert doc["id"] == image_id
        assert (doc["width"], doc["height"]) == (w, h)
        probs = doc["probabilities"]
        assert list(probs) == list(ISIC_CLASSES)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-9)
        assert doc["predicted_class"] == max(probs, key=probs.get)
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / doc["mask_file"]))
        assert doc["mask_area_fraction"] == pytest.approx((mask == 255).mean())
        assert doc["attention_maps"] == ATTENTION_NAMES


def test_overlay_max_side(tmp_path):
    save(tmp_path / "big.png", rgb(300, 120))
    predictor = Predictor(ColourNet(), image_size=32, progress=False)
    predictor.write(
        predictor.predict_paths(tmp_path / "big.png"), tmp_path / "out", overlays=True, overlay_max_side=100
    )
    with Image.open(tmp_path / "out" / "overlays" / "big_overlay.png") as overlay:
        assert overlay.width == 100


def test_failed_run_keeps_earlier_outputs(tmp_path):
    for k in range(3):
        save(tmp_path / "in" / f"ISIC_000000{k}.png", rgb(20, 20, k))
    predictor = Predictor(ColourNet(), image_size=32, progress=False)
    predictor.write(predictor.predict_paths(tmp_path / "in"), tmp_path / "out")
    before = (tmp_path / "out" / "predictions.csv").read_bytes()

    def interrupted():
        results = predictor.predict_paths(tmp_path / "in")
        yield next(results)
        raise KeyboardInterrupt

    other = Predictor(ColourNet((0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 0.0)), image_size=32, progress=False)
    with pytest.raises(KeyboardInterrupt):
        other.write(interrupted(), tmp_path / "out")
    assert (tmp_path / "out" / "predictions.csv").read_bytes() == before
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]


def test_collect_records_sources(tmp_path):
    make_task1(tmp_path / "isic", ["ISIC_0000001", "ISIC_0000002"], subset="Test", masks=False)
    folder = sorted(r.id for r in collect_records(tmp_path / "isic"))
    assert folder == ["ISIC_0000001", "ISIC_0000002"]
    inner = collect_records(tmp_path / "isic" / "ISIC2018_Task1-2_Test_Input")  # LICENSE.txt etc. skipped
    assert sorted(r.id for r in inner) == folder

    save(tmp_path / "m" / "img" / "a.png", rgb(10, 10))
    save(tmp_path / "m" / "img" / "a_segmentation.png", disk(10, 10))
    (tmp_path / "m" / "manifest.csv").write_text("image,mask,label\nimg/a.png,img/a_segmentation.png,NV\n")
    (record,) = collect_records(tmp_path / "m" / "manifest.csv")
    assert (record.id, record.label) == ("a", "NV")
    assert record.mask == (tmp_path / "m" / "img" / "a_segmentation.png")

    # a prepared manifest points at its resized cache; the originals are used instead
    (tmp_path / "m" / "prepared.csv").write_text(
        "id,image,mask,label,orig_image,orig_mask\n"
        f"a,img/a.png,,NV,{tmp_path / 'orig' / 'a.jpg'},{tmp_path / 'orig' / 'a_segmentation.png'}\n"
    )
    (record,) = collect_records(tmp_path / "m" / "prepared.csv")
    assert record.image == tmp_path / "orig" / "a.jpg"
    assert record.mask == tmp_path / "orig" / "a_segmentation.png"

    save(tmp_path / "other" / "a.jpg", rgb(10, 10))
    with pytest.raises(DataError, match="image id a"):
        collect_records([tmp_path / "m" / "img", tmp_path / "other"])
    with pytest.raises(DataError, match="no such file"):
        collect_records(tmp_path / "missing")
    assert collect_records(Record(image=tmp_path / "x.png"))[0].id == "x"


def test_unreadable_image(tmp_path):
    save(tmp_path / "in" / "good.png", rgb(20, 20))
    (tmp_path / "in" / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="bad.png"):
        list(Predictor(ColourNet(), image_size=32, progress=False).predict_paths(tmp_path / "in"))
    results = list(
        Predictor(ColourNet(), image_size=32, skip_errors=True, progress=False).predict_paths(tmp_path / "in")
    )
    assert [r.id for r in results] == ["good"]


def test_predict_command_on_a_folder_with_bad_files(tmp_path, ckpt, capsys):
    """Good images, a truncated JPEG and a text file named .jpg: one line naming a bad file and --skip-errors,
    exit 2 and nothing written; with --skip-errors the good images are predicted."""
    from skinfusion.cli import main

    for k in range(3):
        save(tmp_path / "in" / f"ISIC_000000{k}.jpg", rgb(40, 30, k), quality=95)
    jpeg = (tmp_path / "in" / "ISIC_0000001.jpg").read_bytes()
    (tmp_path / "in" / "ISIC_0000005.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (tmp_path / "in" / "ISIC_0000006.jpg").write_text("not an image")
    command = ["predict", str(tmp_path / "in"), "--ckpt", str(ckpt), "--out", str(tmp_path / "out"), "--no-progress"]
    with pytest.raises(SystemExit) as exit_info:
        main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "ISIC_0000005.jpg" in err or "ISIC_0000006.jpg" in err  # the first bad file met names itself
    assert "--skip-errors" in err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()  # every header is read before anything is predicted
    main([*command, "--skip-errors"])
    assert sorted(p.name for p in (tmp_path / "out" / "masks").iterdir()) == [
        f"ISIC_000000{k}_segmentation.png" for k in range(3)
    ]
    assert len((tmp_path / "out" / "predictions.csv").read_text().splitlines()) == 4


def test_predictor_arguments_are_checked():
    with pytest.raises(ValueError, match="temperature"):
        Predictor(ColourNet(), temperature=0.0)
    with pytest.raises(ValueError, match="batch_size"):
        Predictor(ColourNet(), batch_size=0)
    with pytest.raises(ValueError, match="class names"):
        Predictor(ColourNet(), class_names=["A", "B"])
    with pytest.raises(ValueError, match="normalization"):
        Predictor(ColourNet(), normalization="zscore")


def test_predict_main_cli(tmp_path, ckpt, capsys):
    sizes = write_images(tmp_path / "images")
    summary = predict_main(
        [
            str(tmp_path / "images"),
            "--ckpt",
            str(ckpt),
            "--out",
            str(tmp_path / "out"),
            "--json",
            "--overlays",
            "--tta",
            "--threshold",
            "0.4",
            "--no-progress",
        ]
    )
    assert summary["num_images"] == len(sizes)
    assert len(list((tmp_path / "out" / "masks").iterdir())) == len(sizes)
    assert len(list((tmp_path / "out" / "json").iterdir())) == len(sizes)
    with pytest.raises(SystemExit) as exit_info:
        predict_main(["--help"])
    assert exit_info.value.code == 0
    assert "--tta" in capsys.readouterr().out


def test_postprocess_is_applied(tmp_path):
    """The mask is PostProcess(prob resized to the original size); largest_component drops the small blob."""
    image = np.zeros((64, 64, 3), np.uint8)
    image[...] = (0, 0, 255)
    image[4:30, 4:30] = (255, 0, 0)
    image[50:58, 50:58] = (255, 0, 0)
    save(tmp_path / "two.png", image)
    keep_all = PostProcess(largest_component=False)
    both = next(
        Predictor(ColourNet(), image_size=64, normalization="unit", postprocess=keep_all, progress=False).predict_paths(
            tmp_path / "two.png"
        )
    )
    largest = next(
        Predictor(ColourNet(), image_size=64, normalization="unit", progress=False).predict_paths(tmp_path / "two.png")
    )
    assert both.mask[54, 54]
    assert both.mask[10, 10]
    assert largest.mask[10, 10]
    assert not largest.mask[54, 54]


@pytest.mark.parametrize(
    ("config", "has_mask", "has_probs"),
    [
        ({"decoder": False, "fusion": "none", "attention_placement": ["classifier"]}, False, True),
        ({"classifier": False, "attention_placement": ["skip"]}, True, False),
    ],
    ids=["classifier-only", "segmentation-only"],
)
def test_networks_without_a_part(tmp_path, config, has_mask, has_probs):
    from modelutil import NET_CONFIG

    from skinfusion.nn import SkinFusionNet

    net = SkinFusionNet(**{**NET_CONFIG, **config})
    save(tmp_path / "in" / "ISIC_0000001.png", rgb(40, 30))
    predictor = Predictor(net, image_size=64, progress=False)
    summary = predictor.write(predictor.predict_paths(tmp_path / "in"), tmp_path / "out", overlays=True, json=True)
    assert (summary["masks"] is not None) == has_mask
    assert (summary["csv"] is not None) == has_probs
    assert (tmp_path / "out" / "masks").is_dir() == has_mask
    assert (tmp_path / "out" / "predictions.csv").is_file() == has_probs
    doc = json.loads((tmp_path / "out" / "json" / "ISIC_0000001.json").read_text())
    assert ("probabilities" in doc) == has_probs
    assert ("mask_area_fraction" in doc) == has_mask


@pytest.mark.real_data
def test_real_isic_originals_at_full_resolution(tmp_path, shared_data, ckpt):
    """Full-size ISIC 2018 Task 1 JPEGs (read at reduced DCT scale): masks come back at the original size and
    the official scorer accepts them against the real ground truth."""
    from isic_challenge_scoring.segmentation import SegmentationScore

    records = collect_records(shared_data / "isic2018", subset="Training")
    records = [r for r in records if r.mask is not None][:3]
    predictor = Predictor(ckpt, progress=False)
    predictor.write(predictor.predict_records(records), tmp_path / "out", csv=False)
    truth_dir = tmp_path / "truth"
    truth_dir.mkdir()
    for record in records:
        (truth_dir / Path(record.mask).name).symlink_to(record.mask)
        with Image.open(record.mask) as truth, Image.open(tmp_path / "out" / "masks" / Path(record.mask).name) as pred:
            assert pred.size == truth.size
    score = SegmentationScore.from_dir(truth_dir, tmp_path / "out" / "masks")
    assert 0.0 <= score.macro_average["jaccard"] <= 1.0


def test_heatmap_shape_and_blend():
    image = np.zeros((8, 8, 3), np.uint8)
    attention = np.zeros((2, 2), np.float32)
    attention[0, 0] = 1.0
    heat = heatmap(image, attention, alpha=1.0)
    assert heat.shape == (8, 8, 3)
    assert heat.dtype == np.uint8
    assert not np.array_equal(heat[0, 0], heat[7, 7])  # top-left is the hot corner
    np.testing.assert_array_equal(heatmap(image, attention, alpha=0.0), image)
