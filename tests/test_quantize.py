"""Static int8 export (skinfusion.inference.quantize) and ONNX files run by the Predictor (OnnxNet).

The quantized network is the tiny test network trained for 40 steps on synthetic lesions: an untrained one
scores near 0 on every metric, int8 or not, and a guard comparing such scores could not fail.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from modelutil import IMAGE_SIZE, make_module, save_ckpt
from PIL import Image

from skinfusion.cli import main
from skinfusion.data.dataset import META_DIM, SkinLesionDataset
from skinfusion.data.records import Record
from skinfusion.data.synthetic import write_synthetic
from skinfusion.data.transforms import build_transforms
from skinfusion.errors import WeightsError
from skinfusion.inference.export import export_main, export_onnx
from skinfusion.inference.inputs import collect_records
from skinfusion.inference.onnxnet import OnnxNet
from skinfusion.inference.predictor import Predictor, load_model, predict_main
from skinfusion.inference.quantize import (
    MIN_GUARD_IMAGES,
    QuantizationError,
    quantize_int8,
    quantize_onnx,
    select_images,
)

#: Calibrate on 16 training images, guard on the validation split (44 images with masks and labels), tolerance 0.05:
#: on 44 images one image crossing the thresholded Jaccard's 0.65 step moves it by ~0.015, and one label moves the
#: balanced accuracy (7 classes, ~6 images each) by ~0.024, so a good int8 model can differ by one or two of those
#: (seen: 0.015 and 0.024). The broken calibration below moves the balanced accuracy by ~0.4.
TOLERANCE = "0.05"
QUANTIZE = ["--format", "onnx", "--quantize", "int8", "--split", "train", "--guard-split", "val", "--n", "16"]
QUANTIZE += ["--tolerance", TOLERANCE]
#: The ImageNet mean colour: normalised, the input is 0 everywhere, so calibration sees only the biases' activations
#: and every range it records is far too narrow for a real image (clipped).
MEAN_COLOUR = (124, 116, 104)


def _fit(module, records, steps: int = 40) -> None:
    """A few Adam steps on the masks and labels of ``records`` at 64 px (no Lightning: seconds, not tens)."""
    dataset = SkinLesionDataset(
        records, module.class_names, build_transforms("val", image_size=IMAGE_SIZE), use_metadata=True
    )
    data = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
    generator = torch.Generator().manual_seed(0)
    net = module.net.train()
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(steps):
        index = torch.randint(0, len(dataset), (16,), generator=generator)
        output = net(data["image"][index], data["meta"][index])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(output.mask_logits, data["mask"][index])
        loss = loss + torch.nn.functional.cross_entropy(output.class_logits, data["label"][index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    module.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic data (48 train, 48 val images of 64 px), the trained checkpoint, its fp32 ONNX export."""
    root = tmp_path_factory.mktemp("quantize")
    records = write_synthetic(root / "data", n=96, seed=0, size=64, fractions=(0.5, 0.5, 0.0))
    torch.manual_seed(0)
    module = make_module(seed=1, meta_dim=META_DIM)
    _fit(module, [r for r in records if r.meta["split"] == "train"])
    ckpt = save_ckpt(root / "model.ckpt", module)
    net, settings = load_model(ckpt)
    export_onnx(net, root / "fp32.onnx", settings)
    return {"root": root, "manifest": root / "data" / "manifest.csv", "ckpt": ckpt, "fp32": root / "fp32.onnx"}


@pytest.fixture(scope="module")
def int8(trained):
    """The int8 export made from the checkpoint by the command line, with a good calibration."""
    out = trained["root"] / "int8" / "model.onnx"
    export_main(
        ["--ckpt", str(trained["ckpt"]), *QUANTIZE, "--calibration", str(trained["manifest"]), "--out", str(out)]
    )
    return out


def _flat_calibration(trained, folder: Path) -> Path:
    """A copy of the data set whose training images (the calibration split) are flat mean-colour; validation as is."""
    data = trained["manifest"].parent
    shutil.copytree(data, folder)
    for record in collect_records(trained["manifest"]):
        if record.meta["split"] == "train":
            image = Image.new("RGB", Image.open(record.image).size, MEAN_COLOUR)
            image.save(folder / "images" / Path(record.image).name)
    manifest = folder / "manifest.csv"  # its orig_image column names the originals: point it at the copies
    manifest.write_text(manifest.read_text().replace(str(data.resolve()), str(folder.resolve())))
    return manifest


def _val(trained) -> list[Record]:
    return [r for r in collect_records(trained["manifest"]) if r.meta["split"] == "val"]


def test_int8_export_writes_file_record_and_report(trained, int8):
    fp32 = OnnxNet(trained["fp32"])
    quantized = OnnxNet(int8)
    assert quantized.settings == fp32.settings  # the inference record travels with the int8 file too
    assert quantized.quantization["dtype"] == "int8"
    assert quantized.quantization["calibration"]["images"] == 16
    assert quantized.output_names == fp32.output_names
    report = json.loads(int8.with_name("model.quantization.json").read_text())
    assert int8.with_name("model.quantization.md").is_file()
    assert report["size_bytes"]["int8"] == int8.stat().st_size < 0.5 * report["size_bytes"]["fp32"]
    assert report["guard"]["passed"]
    assert report["guard"]["images"] == len(_val(trained))
    assert set(report["guard"]["metrics"]) == {"threshold_jaccard", "dice", "balanced_accuracy"}
    assert report["guard"]["metrics"]["dice"]["fp32"] > 0.5  # the trained network segments: the guard can fail
    assert report["runtime"]["int8_ops"]["QLinearConv"] > 40
    # --keep-fp32 first (the default) leaves the stem convolution in fp32, and the report says so
    assert {"name": report["quantization"]["nodes_excluded"][0], "op_type": "Conv"} in report["runtime"]["fp32_nodes"]
    assert not [p for p in int8.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_int8_class_output_is_not_quantized(trained, int8):
    """The class logits leave the int8 file in fp32: quantized to 256 levels, two classes often share the top score,
    which the ISIC scorer counts as wrong. So neither the node writing them nor its inputs come out of a
    DequantizeLinear (the class head is excluded from quantization), and no validation image's top score is tied."""
    import onnx

    graph = onnx.load(str(int8)).graph
    producer = {o: n for n in graph.node for o in n.output}
    writer = producer["class_logits"]
    assert writer.op_type != "DequantizeLinear"
    assert writer.name in OnnxNet(int8).quantization["nodes_excluded"]
    # nor what it adds: the linear classifier's output is not a dequantized uint8 tensor either
    assert all(producer[i].op_type != "DequantizeLinear" for i in writer.input if i in producer)
    probabilities = np.stack(
        [p.probabilities for p in Predictor(OnnxNet(int8), progress=False).predict_records(_val(trained))]
    )
    top = np.sort(probabilities, axis=1)
    assert (top[:, -1] > top[:, -2]).all()


def test_fp32_op_types_leave_every_node_of_that_type_in_fp32(trained, tmp_path):
    """``fp32_op_types=("Resize",)``: every Resize node is excluded (the decoder has one per stage), the stem is
    quantized with ``keep_fp32="none"``, and the file still runs and diagnoses like fp32 on most images."""
    import onnx

    calibration = _val(trained)[:8]
    info = quantize_int8(trained["fp32"], tmp_path / "m.onnx", calibration, keep_fp32="none", fp32_op_types=["Resize"])
    resize = [n.name for n in onnx.load(str(tmp_path / "m.onnx")).graph.node if n.op_type == "Resize"]
    assert len(resize) >= 4
    assert set(resize) <= set(info["nodes_excluded"])
    stem = quantize_int8(trained["fp32"], tmp_path / "s.onnx", calibration)["nodes_excluded"][0]
    assert stem not in info["nodes_excluded"]
    records = _val(trained)[:16]
    a = Predictor(OnnxNet(trained["fp32"]), progress=False).predict_records(records)
    b = Predictor(OnnxNet(tmp_path / "m.onnx"), progress=False).predict_records(records)
    agree = np.mean([x.probabilities.argmax() == y.probabilities.argmax() for x, y in zip(a, b, strict=True)])
    assert agree >= 0.75


def test_int8_outputs_match_fp32(trained, int8):
    """On validation images (measured here: 0.008, 0.23, 0.016, 99.2%): mask probabilities within 0.05 on average
    and 0.5 at worst, class probabilities within 0.1, post-processed masks equal on 97% of the pixels."""
    records = _val(trained)[:16]
    fp32, quantized = Predictor(trained["fp32"], progress=False), Predictor(int8, progress=False)
    for a, b in zip(fp32.predict_records(records), quantized.predict_records(records), strict=True):
        assert np.abs(a.mask_prob - b.mask_prob).mean() < 0.05
        assert np.abs(a.mask_prob - b.mask_prob).max() < 0.5
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=0.1)
        assert (a.mask == b.mask).mean() > 0.97
        assert a.attention
        assert set(a.attention) == set(b.attention)


def test_guard_refuses_flat_calibration(trained, int8, capsys):
    """The command of the int8 fixture, with the same guard images and tolerance; only the calibration is flat."""
    manifest = _flat_calibration(trained, trained["root"] / "flat")
    out = trained["root"] / "flat-out" / "model.onnx"
    out.parent.mkdir()
    shutil.copy(int8, out)  # a valid earlier file at --out stays as it was
    before = out.read_bytes()
    argv = ["export", "--ckpt", str(trained["fp32"]), *QUANTIZE, "--calibration", str(manifest), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "int8 model refused" in message
    assert f"tolerance {TOLERANCE}" in message
    assert "balanced accuracy: int8" in message
    assert "images whose top-1 class changed, per true class: " in message
    assert out.read_bytes() == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["model.onnx"]  # no report, no temporary file


def test_quantize_onnx_refuses_a_flat_calibration_image(trained, tmp_path):
    """The Python API, calibrated on one flat mean-colour image: refused with the metric and both values; nothing
    written."""
    calibration = [Record(image=tmp_path / "flat.png")]
    Image.new("RGB", (64, 64), MEAN_COLOUR).save(calibration[0].image)
    guard = _val(trained)
    with pytest.raises(QuantizationError, match=r"balanced accuracy: int8 [0-9.]+ vs fp32 [0-9.]+") as info:
        quantize_onnx(trained["fp32"], tmp_path / "model.onnx", calibration, guard, tolerance=float(TOLERANCE))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flat.png"]
    # The refusal says, per true class, how many of its guard images changed class: the counts add up to the
    # images the two models disagree on, and each class's total is its number of guard images.
    agreement = info.value.result["agreement"]
    changed = agreement["top1_changed_per_class"]
    labels = Counter(r.label for r in guard)
    assert None not in labels  # every guard image of the fixture is labelled
    assert {c: n for c, (_, n) in changed.items()} == dict(labels)
    disagreements = sum(k for k, _ in changed.values())
    assert disagreements == round((1 - agreement["top1_agreement"]) * len(guard)) > 0
    assert "images whose top-1 class changed, per true class: " in str(info.value)


def test_predict_and_evaluate_run_onnx_files(trained, int8, tmp_path):
    images = [str(r.image) for r in _val(trained)[:6]]
    summaries = {}
    for name, model in (("ckpt", trained["ckpt"]), ("fp32", trained["fp32"]), ("int8", int8)):
        summaries[name] = predict_main([*images, "--ckpt", str(model), "--out", str(tmp_path / name), "--json"])
    for name in ("fp32", "int8"):
        assert summaries[name]["num_images"] == 6
        for kind in ("masks", "json"):
            assert sorted(p.name for p in (tmp_path / name / kind).iterdir()) == sorted(
                p.name for p in (tmp_path / "ckpt" / kind).iterdir()
            )
        assert (tmp_path / name / "predictions.csv").read_text().splitlines()[0].startswith("image,MEL,NV")
    ckpt_rows = np.loadtxt(tmp_path / "ckpt" / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 8))
    fp32_rows = np.loadtxt(tmp_path / "fp32" / "predictions.csv", delimiter=",", skiprows=1, usecols=range(1, 8))
    np.testing.assert_allclose(fp32_rows, ckpt_rows, atol=1e-4)  # ONNX Runtime fp32 = PyTorch

    # evaluate --ckpt model.onnx scores the validation split as the export's guard scored the fp32 model
    metrics = main_evaluate(trained, tmp_path / "report")
    report = json.loads(int8.with_name("model.quantization.json").read_text())
    assert metrics["task1/dice"] == pytest.approx(report["guard"]["metrics"]["dice"]["fp32"], abs=1e-9)


def main_evaluate(trained, out: Path) -> dict:
    from skinfusion.evaluation.report import evaluate_main

    return evaluate_main(
        ["--ckpt", str(trained["fp32"]), "--truth", str(trained["manifest"]), "--split", "val", "--out", str(out)]
    )


def test_onnxnet_is_called_like_the_network(trained, tmp_path):
    net, settings = load_model(trained["ckpt"])
    net.eval()
    onnx_net = OnnxNet(trained["fp32"])
    assert onnx_net.settings == settings
    assert onnx_net.quantization is None
    assert (onnx_net.image_size, onnx_net.meta_dim, onnx_net.num_classes) == (IMAGE_SIZE, META_DIM, 7)
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    meta = torch.rand(3, META_DIM, generator=generator)
    with torch.no_grad():
        expected = net(image, meta)
    got = onnx_net(image, meta)
    torch.testing.assert_close(got.mask_logits, expected.mask_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.class_logits, expected.class_logits, atol=1e-4, rtol=1e-4)
    assert list(got.attention) == list(expected.attention)
    with pytest.raises(ValueError, match="fixed input side"):
        onnx_net(torch.zeros(1, 3, 32, 32), meta[:1])
    with pytest.raises(ValueError, match="pass meta"):
        onnx_net(image)
    with pytest.raises(ValueError, match="gradcam differentiates the PyTorch network"):
        next(
            Predictor(onnx_net, explain="gradcam", progress=False).predict_paths(
                collect_records(trained["manifest"])[0]
            )
        )
    (tmp_path / "not.onnx").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match="ONNX Runtime cannot load it"):
        OnnxNet(tmp_path / "not.onnx")


def test_sessions_split_a_batch_and_give_the_same_outputs(trained, int8):
    """OnnxNet(sessions=2): a batch of 5 is run as 2 + 3 images on two sessions, one of 1 image on the main session;
    the outputs equal one session's, to the bit (each image is computed alone either way)."""
    one, two = OnnxNet(int8), OnnxNet(int8, sessions=2)
    assert len(two.sessions) == 2
    assert one.sessions == []
    generator = torch.Generator().manual_seed(1)
    for batch in (5, 1):
        image = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        meta = torch.rand(batch, META_DIM, generator=generator)
        calls = []
        for i, session in enumerate([two.session, *two.sessions]):  # which session is given how many images
            run = session.run
            session.run = lambda names, feed, run=run, i=i, calls=calls: (
                calls.append((i, len(feed["image"]))) or run(names, feed)
            )
        expected, got = one(image, meta), two(image, meta)
        assert sorted(calls) == ([(1, 2), (2, 3)] if batch == 5 else [(0, 1)])  # concurrent: in any order
        torch.testing.assert_close(got.mask_logits, expected.mask_logits, atol=0, rtol=0)
        torch.testing.assert_close(got.class_logits, expected.class_logits, atol=0, rtol=0)
        for session in [two.session, *two.sessions]:
            del session.run
    with pytest.raises(ValueError, match="sessions must be >= 1"):
        OnnxNet(int8, sessions=0)


def test_predict_onnx_sessions(trained, int8, tmp_path, capsys):
    images = [str(r.image) for r in _val(trained)[:5]]
    for n in (1, 2):
        predict_main([*images, "--ckpt", str(int8), "--out", str(tmp_path / f"s{n}"), "--onnx-sessions", str(n)])
    assert (tmp_path / "s2" / "predictions.csv").read_text() == (tmp_path / "s1" / "predictions.csv").read_text()
    with pytest.raises(SystemExit) as exit_info:  # a checkpoint is not run by ONNX Runtime: refused, one line
        main(
            ["predict", images[0], "--ckpt", str(trained["ckpt"]), "--out", str(tmp_path / "x"), "--onnx-sessions", "2"]
        )
    assert exit_info.value.code == 2
    assert "--onnx-sessions 2: give N >= 1, with an ONNX export as --ckpt" in capsys.readouterr().err


def _records(splits: dict[str, int], truth: bool = True) -> list[Record]:
    return [
        Record(image=Path(f"{split}_{i}.png"), label="NV" if truth else None, meta={"split": split})
        for split, count in splits.items()
        for i in range(count)
    ]


def test_select_images_keeps_the_guard_disjoint_or_says_it_is_not():
    classes = ("MEL", "NV")
    calibration, guard, source = select_images(_records({"train": 10, "val": 60}), classes, "val", n=16, guard_n=100)
    assert len(calibration) == 16
    assert all(r.meta["split"] == "val" for r in calibration)
    assert len(guard) == 44
    assert not {r.id for r in guard} & {r.id for r in calibration}
    assert "disjoint" in source
    # too few images left: the whole split, and the source says so
    calibration, guard, source = select_images(_records({"val": MIN_GUARD_IMAGES + 5}), classes, "val", n=16)
    assert len(guard) == MIN_GUARD_IMAGES + 5
    assert "overlapping the calibration images (only 9 disjoint" in source
    # another split for the guard; images without truth are not guard images
    records = _records({"train": 30}, truth=False) + _records({"test": 5})
    _, guard, source = select_images(records, classes, "train", n=8, guard_split="test")
    assert [r.id for r in sorted(guard, key=lambda r: r.id)] == [f"test_{i}" for i in range(5)]
    assert source == "split 'test', disjoint from the calibration images"
    with pytest.raises(ValueError, match="nothing to guard"):
        select_images(_records({"train": 30}, truth=False), classes, "train")
    with pytest.raises(ValueError, match="no split column"):
        select_images([Record(image=Path("a.png"), label="NV")], classes, "val")
    assert select_images([Record(image=Path("a.png"), label="NV")], classes, "all")[2].startswith("every image")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "onnx", "--quantize", "int8"], "needs --calibration"),
        (["--format", "torchscript", "--quantize", "int8", "--calibration", "m.csv"], "add --format onnx"),
        (["--format", "onnx", "--calibration", "m.csv"], "goes with --quantize"),
    ],
)
def test_quantize_arguments_are_checked(extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--ckpt", "m.ckpt", "--out", "x.onnx", *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
