"""Explanations: Grad-CAM against a hand computation, lesion focus by hand, and the predict/evaluate wiring."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from modelutil import IMAGE_SIZE, make_module, save_ckpt

from skinfusion.data.synthetic import write_synthetic
from skinfusion.evaluation.report import evaluate, evaluate_main
from skinfusion.inference.explain import explain, gradcam_layer, lesion_focus, pick_attention
from skinfusion.inference.predictor import Predictor, predict_main

# ---------------------------------------------------------------- the maps themselves


def _hand_gradcam(net, image: torch.Tensor, classes: list[int]) -> np.ndarray:
    """Grad-CAM from its definition: ReLU(sum_k mean_xy(d logit_c / d A_k) * A_k), upsampled, min-max scaled."""
    features = {}
    handle = gradcam_layer(net).register_forward_hook(lambda module, args, out: features.setdefault("A", out))
    try:
        logits = net(image).class_logits
    finally:
        handle.remove()
    activations = features["A"]
    chosen = logits[torch.arange(len(classes)), torch.tensor(classes)].sum()
    (grads,) = torch.autograd.grad(chosen, activations)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * activations).sum(1)).detach().numpy()
    maps = []
    for one in cam:
        one = cv2.resize(one, image.shape[-1:-3:-1])
        one = one - one.min()
        maps.append(one / max(one.max(), 1e-7))
    return np.stack(maps)


def test_gradcam_equals_its_definition():
    net = make_module().net.eval()
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0))
    classes = [0, 3]
    got = explain(net, image, "gradcam", classes=classes)
    expected = _hand_gradcam(net, image, classes)
    assert got.shape == (2, IMAGE_SIZE, IMAGE_SIZE)
    assert expected.max() > 0  # the class evidence is not empty, so the comparison means something
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Another class gives another map: the class is really what is explained.
    assert not np.allclose(explain(net, image, "gradcam", classes=[1, 1]), got, atol=1e-3)


def test_gradcam_defaults_to_the_top_class_and_maps_are_in_unit_range():
    net = make_module().net.eval()
    image = torch.randn(3, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    top = net(image).class_logits.argmax(1).tolist()
    for method in ("gradcam", "gradcam++"):
        default = explain(net, image, method)
        assert default.shape == (3, IMAGE_SIZE, IMAGE_SIZE)
        assert default.min() >= 0.0
        assert default.max() <= 1.0 + 1e-6
        np.testing.assert_allclose(default, explain(net, image, method, classes=top), atol=1e-6)


def test_gradcam_is_the_same_under_no_grad_and_inference_mode():
    """Callers run under no_grad or a Lightning loop's inference mode: explain() still gets its gradients."""
    net = make_module().net.eval()
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(3))
    expected = explain(net, image, "gradcam")
    assert expected.max() > 0
    with torch.no_grad():
        np.testing.assert_allclose(explain(net, image, "gradcam"), expected, atol=1e-6)
    with torch.inference_mode():
        inference_image = image.clone()  # a tensor autograd refuses outside explain()
        np.testing.assert_allclose(explain(net, inference_image, "gradcam"), expected, atol=1e-6)


def test_attention_method_is_the_classifier_map_upsampled():
    net = make_module().net.eval()
    image = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        attention = net(image).attention
    raw = pick_attention(attention)
    assert raw is attention["classifier"]
    got = explain(net, image, "attention")[0]
    expected = F.interpolate(raw, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
    expected = (expected - expected.min()) / (expected.max() - expected.min())
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_pick_attention_order_without_a_classifier_map():
    """Classifier map first, else the deepest encoder block (stage before block index), else the deepest skip."""
    maps = {name: object() for name in ["encoder.layer3.0", "encoder.layer3.5", "encoder.layer4.2", "skip.3"]}
    assert pick_attention(maps) is maps["encoder.layer4.2"]  # not layer3.5, whose block index is higher
    assert pick_attention({**maps, "classifier": "c"}) == "c"
    skips = {f"skip.{i}": object() for i in (0, 2, 10)}
    assert pick_attention(skips) is skips["skip.10"]
    assert pick_attention({}) is None


def test_explain_rejects_unknown_methods_and_missing_attention():
    image = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with pytest.raises(ValueError, match="unknown explanation"):
        explain(make_module().net, image, "saliency")
    with pytest.raises(ValueError, match="no attention map"):
        explain(make_module(attention=None, attention_placement=[]).net, image, "attention")


def test_lesion_focus_hand_computed():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True  # the lesion covers a quarter of the image
    heat = np.zeros((4, 4))
    heat[0, 0], heat[3, 3] = 3.0, 1.0  # three quarters of the mass inside, maximum inside
    assert lesion_focus(heat, mask) == {"mass_inside": 0.75, "pointing_hit": 1.0, "lesion_share": 0.25}
    heat[3, 3] = 5.0  # maximum outside
    assert lesion_focus(heat, mask)["pointing_hit"] == 0.0
    assert lesion_focus(heat, mask)["mass_inside"] == pytest.approx(3 / 8)
    # A uniform map's mass inside is the lesion's share; an all-zero map counts as uniform.
    assert lesion_focus(np.ones((4, 4)), mask)["mass_inside"] == pytest.approx(0.25)
    assert lesion_focus(np.zeros((4, 4)), mask)["mass_inside"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="differ in size"):
        lesion_focus(np.ones((3, 4)), mask)


# ---------------------------------------------------------------- predict --explain


def test_predictor_explanation_at_the_original_size(tmp_path):
    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module())
    rng = np.random.default_rng(0)
    image = tmp_path / "wide.png"
    cv2.imwrite(str(image), rng.integers(0, 255, (50, 90, 3), dtype=np.uint8))
    (prediction,) = Predictor(ckpt, progress=False, explain="gradcam").predict_paths([image])
    assert prediction.explain_method == "gradcam"
    assert prediction.heat.shape == (IMAGE_SIZE, IMAGE_SIZE)
    explanation = prediction.explanation
    assert explanation.shape == (50, 90)  # (height, width) of the file
    assert explanation.dtype == np.float32
    assert explanation.min() >= 0.0
    assert explanation.max() <= 1.0
    # The network-size map is the one Grad-CAM computes on the predictor's input, for the top class.
    (plain,) = Predictor(ckpt, progress=False).predict_paths([image])
    assert plain.heat is None
    assert plain.explanation is None
    assert np.array_equal(plain.probabilities, prediction.probabilities)


def test_predictor_refuses_an_explanation_it_cannot_give(tmp_path):
    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module(attention=None, attention_placement=[]))
    with pytest.raises(ValueError, match="needs a network with attention"):
        Predictor(ckpt, explain="attention")
    with pytest.raises(ValueError, match="unknown explanation"):
        Predictor(ckpt, explain="lime")


def test_predict_cli_writes_the_map_beside_the_mask_and_names_it_in_the_json(tmp_path):
    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module())
    write_synthetic(tmp_path / "syn", n=3, seed=1, size=72)
    images = sorted((tmp_path / "syn").rglob("*.jpg")) or sorted((tmp_path / "syn").rglob("*.png"))
    images = [p for p in images if "segmentation" not in p.name][:2]
    out = tmp_path / "out"
    summary = predict_main(
        [*map(str, images), "--ckpt", str(ckpt), "--out", str(out), "--explain", "gradcam++", "--json", "--overlays"]
    )
    assert summary["explanations"] == str(out / "explanations")
    for image in images:
        doc = json.loads((out / "json" / f"{image.stem}.json").read_text())
        assert doc["explanation"]["method"] == "gradcam++"
        assert doc["explanation"]["class"] == doc["predicted_class"]
        png = cv2.imread(str(out / doc["explanation"]["file"]), cv2.IMREAD_UNCHANGED)
        assert png.shape == (IMAGE_SIZE, IMAGE_SIZE)
        assert png.dtype == np.uint8
        assert png.max() == 255  # scaled to the full range: the map is not blank
        overlay = cv2.imread(str(out / "overlays" / f"{image.stem}_overlay.png"))
        assert overlay is not None


# ---------------------------------------------------------------- evaluate --explain


def test_evaluate_explain_reports_lesion_focus_against_a_uniform_map(tmp_path):
    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module())
    write_synthetic(tmp_path / "syn", n=6, seed=2, size=72)
    manifest = tmp_path / "syn" / "manifest.csv"
    out = tmp_path / "report"
    report = evaluate_main(
        ["--ckpt", str(ckpt), "--truth", str(manifest), "--split", "all", "--out", str(out), "--explain"]
    )
    # The uniform row is the lesion's mean share of the image at the network size: computed here by hand.
    from skinfusion.inference.inputs import collect_records

    shares = []
    for record in collect_records(manifest):
        if record.mask is None:
            continue
        mask = cv2.imread(str(record.mask), cv2.IMREAD_GRAYSCALE) > 127
        small = cv2.resize(mask.astype(np.uint8), (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_NEAREST)
        shares.append(small.mean())
    assert report["explain/uniform/mass_inside"] == pytest.approx(np.mean(shares), abs=1e-9)
    assert report["explain/uniform/pointing_game"] == pytest.approx(np.mean(shares), abs=1e-9)
    for name in ("gradcam", "attention classifier", "attention skip.4"):
        for key in ("mass_inside", "pointing_game"):
            assert 0.0 <= report[f"explain/{name}/{key}"] <= 1.0
    text = (out / "explain.md").read_text()
    assert "| uniform |" in text
    assert "| gradcam |" in text
    assert sorted(p.name for p in (out / "explain").glob("*.png")) == [
        "example_0.png",
        "example_1.png",
        "example_2.png",
    ]


def test_evaluate_explain_predicts_each_image_once_per_gradcam_method(tmp_path, monkeypatch):
    """The pass that writes the predictions also gives the first method's maps: no image is predicted twice for
    the same method, and the table equals measuring the focus on its own."""
    from skinfusion.inference.explain import measure_lesion_focus
    from skinfusion.inference.inputs import collect_records

    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module())
    write_synthetic(tmp_path / "syn", n=6, seed=2, size=72)
    manifest = tmp_path / "syn" / "manifest.csv"
    methods = ["attention", "gradcam", "gradcam++"]
    alone, _ = measure_lesion_focus(Predictor(ckpt, progress=False), collect_records(manifest), methods)
    predicted: list[tuple[str | None, str]] = []
    original = Predictor.predict_records

    def counting(self, records, *args, **kwargs):
        for prediction in original(self, records, *args, **kwargs):
            predicted.append((self.explain, prediction.id))
            yield prediction

    monkeypatch.setattr(Predictor, "predict_records", counting)
    report = evaluate(Predictor(ckpt, progress=False), manifest, tmp_path / "report", explain=methods)
    images = [r.id for r in collect_records(manifest) if r.mask or r.label]
    assert sorted(predicted) == sorted([("gradcam", i) for i in images] + [("gradcam++", i) for i in images])
    for name, row in alone.items():
        for key in ("mass_inside", "pointing_game"):
            assert report[f"explain/{name}/{key}"] == pytest.approx(row[key], abs=1e-6), (name, key)
    assert not (tmp_path / "report" / "predictions" / "explanations").exists()  # evaluate writes no heat files


def test_evaluate_explain_needs_a_model(tmp_path):
    write_synthetic(tmp_path / "syn", n=4, seed=2, size=72)
    with pytest.raises(ValueError, match="needs a model"):
        evaluate(tmp_path / "predictions", tmp_path / "syn" / "manifest.csv", tmp_path / "out", explain=["gradcam"])


def test_evaluate_explain_of_a_network_without_decoder_or_attention(tmp_path):
    """The paper's baseline: diagnosis scored alone, Grad-CAM measured against the true masks all the same."""
    module = make_module(attention=None, attention_placement=[], decoder=False, fusion="none")
    ckpt = save_ckpt(tmp_path / "model.ckpt", module)
    write_synthetic(tmp_path / "syn", n=6, seed=2, size=72)
    out = tmp_path / "report"
    report = evaluate_main(
        ["--ckpt", str(ckpt), "--truth", str(tmp_path / "syn" / "manifest.csv"), "--out", str(out), "--explain"]
    )
    assert "task3/balanced_accuracy" in report
    assert not any(key.startswith("task1/") for key in report)  # no segmentation output, no segmentation score
    assert {key.split("/")[1] for key in report if key.startswith("explain/")} == {"gradcam", "uniform"}


def test_predictor_attention_explanation_equals_explain_on_its_input(tmp_path):
    """predict --explain attention reuses the forward pass's maps: the same map explain() computes afresh."""
    from skinfusion.data.imageio import read_image
    from skinfusion.data.transforms import build_transforms

    ckpt = save_ckpt(tmp_path / "model.ckpt", make_module())
    rng = np.random.default_rng(1)
    image = tmp_path / "square.png"
    cv2.imwrite(str(image), rng.integers(0, 255, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8))
    predictor = Predictor(ckpt, progress=False, explain="attention")
    (prediction,) = predictor.predict_paths([image])
    transform = build_transforms("predict", image_size=predictor.image_size, normalization=predictor.normalization)
    batch = transform(image=read_image(image))["image"][None]
    np.testing.assert_allclose(prediction.heat, explain(predictor.net, batch, "attention")[0], atol=1e-6)
