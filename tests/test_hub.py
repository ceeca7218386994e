"""skinfusion.nn.hub: the Hugging Face layout (save_pretrained / from_pretrained), offline, against the checkpoint."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from imgutil import rgb, save
from modelutil import IMAGE_SIZE, make_module, save_ckpt

from skinfusion.errors import WeightsError
from skinfusion.inference.export import export_main
from skinfusion.inference.predictor import Predictor, load_model
from skinfusion.nn import SkinFusionNet
from skinfusion.nn.hub import load_pretrained


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """No Hub access: HF_HUB_OFFLINE (read by huggingface_hub at import, so its constant too) and no sockets."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError("network access during a hub test")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def module():
    return make_module(seed=7)


@pytest.fixture
def ckpt(tmp_path, module):
    """A checkpoint whose record differs from the defaults (64 px, unit normalisation)."""
    return save_ckpt(tmp_path / "m.ckpt", module, normalization="unit")


@pytest.fixture
def images(tmp_path):
    for k, (w, h) in enumerate([(50, 30), (64, 64), (33, 71)]):
        save(tmp_path / "in" / f"ISIC_000000{k}.png", rgb(w, h, k))
    return tmp_path / "in"


def test_folder_predicts_what_the_checkpoint_predicts(tmp_path, ckpt, images):
    net, settings = load_model(ckpt)
    net.save_pretrained(tmp_path / "hf", settings=settings)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "config.json", "model.safetensors"]

    loaded, recorded = load_pretrained(tmp_path / "hf")
    assert recorded == settings
    assert not loaded.training
    for key, value in net.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

    from_ckpt = list(Predictor(ckpt, device="cpu", progress=False).predict_paths(images))
    from_folder = list(Predictor(tmp_path / "hf", device="cpu", progress=False).predict_paths(images))
    assert len(from_folder) == 3
    for a, b in zip(from_ckpt, from_folder, strict=True):
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-6, rtol=0)
        np.testing.assert_allclose(b.mask_prob, a.mask_prob, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(b.mask, a.mask)
        assert b.attention.keys() == a.attention.keys()


def test_config_json_is_the_record(tmp_path, module, ckpt):
    net, settings = load_model(ckpt)
    net.save_pretrained(tmp_path / "hf", settings=settings)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config == {
        "format": "skinfusion.net",
        "net_config": {k: v for k, v in module.net.config.items() if k != "pretrained"},
        "class_names": list(module.class_names),
        "image_size": IMAGE_SIZE,
        "normalization": "unit",
    }
    assert config["net_config"]["encoder"] == "test_resnet"


def test_from_pretrained_offline_keeps_the_record(tmp_path, ckpt):
    net, settings = load_model(ckpt)
    net.save_pretrained(tmp_path / "hf", settings=settings)
    loaded = SkinFusionNet.from_pretrained(str(tmp_path / "hf"))  # the mixin's API, a string path
    assert isinstance(loaded, SkinFusionNet)
    image = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        expected, got = net.eval()(image), loaded(image)
    assert torch.equal(got.class_logits, expected.class_logits)
    assert torch.equal(got.mask_logits, expected.mask_logits)
    assert SkinFusionNet.from_pretrained(tmp_path / "hf", dropout=0.0).config["dropout"] == 0.0  # an override
    # saving a loaded network again keeps its record (not the 224 px / imagenet defaults)
    loaded.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == json.loads(
        (tmp_path / "hf" / "config.json").read_text()
    )


def test_model_card(tmp_path, ckpt):
    net, settings = load_model(ckpt)
    metrics = {"task3/balanced_accuracy": 0.61234, "task1/jaccard_thresholded": None, "confusion_matrix": {"x": 1}}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    net.save_pretrained(tmp_path / "hf", settings=settings, metrics=tmp_path / "metrics.json")
    card = (tmp_path / "hf" / "README.md").read_text()
    assert card.startswith("---\n")
    assert "license: cc-by-nc-4.0" in card
    assert "library_name: skinfusion" in card
    assert "CC BY-NC 4.0" in card
    assert "HAM10000" in card
    assert "not a medical device" in card
    assert "Intended use" in card
    for name in settings.class_names:
        assert f"| {name} |" in card
    assert "| task3/balanced_accuracy | 0.6123 |" in card
    assert "| task1/jaccard_thresholded | None |" in card
    assert "confusion_matrix" not in card
    # saving again rewrites the card (no stale metrics)
    net.save_pretrained(tmp_path / "hf", settings=settings)
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "task3/balanced_accuracy" not in card
    assert "No evaluation was supplied" in card


def test_export_hf_command(tmp_path, ckpt, images, capsys):
    from skinfusion.cli import main

    (tmp_path / "metrics.json").write_text(json.dumps({"task3/balanced_accuracy": 0.5}))
    main(["export", "--ckpt", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf"), "--metrics", "metrics.json"])
    assert "wrote" in capsys.readouterr().out
    assert "| task3/balanced_accuracy | 0.5 |" in (tmp_path / "hf" / "README.md").read_text()
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["image_size"] == IMAGE_SIZE
    assert not [p for p in (tmp_path / "hf").iterdir() if p.name.startswith(".")]  # no temporary file left
    # the folder is a model wherever a checkpoint is
    main(["predict", str(images), "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "out"), "--no-progress"])
    assert len((tmp_path / "out" / "predictions.csv").read_text().splitlines()) == 4
    export_main(["--ckpt", str(tmp_path / "hf"), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")])
    with pytest.raises(SystemExit):
        export_main(["--ckpt", str(ckpt), "--format", "onnx", "--out", "m.onnx", "--metrics", "metrics.json"])


def test_folder_missing_weights_is_a_clear_error(tmp_path, ckpt, images, capsys):
    from skinfusion.cli import main

    net, settings = load_model(ckpt)
    net.save_pretrained(tmp_path / "hf", settings=settings)
    (tmp_path / "hf" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"hf: missing model\.safetensors"):
        load_model(tmp_path / "hf")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(images), "--ckpt", str(tmp_path / "hf"), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing model.safetensors" in err
    assert "Traceback" not in err
    with pytest.raises(WeightsError, match=r"missing config\.json and model\.safetensors"):
        load_model(tmp_path)  # a folder of something else


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("{not json", "not readable JSON"),
        ('{"encoder": "test_resnet"}', "not a skinfusion config"),
        ('{"format": "skinfusion.net", "net_config": {}, "normalization": "zscore"}', "bad config.json"),
        ('{"format": "skinfusion.net", "net_config": {"encoder": "test_resnet", "attention": "nope"}}', "build"),
        ('{"format": "skinfusion.net", "net_config": {"encoder": "test_resnet"}}', "do not match"),
    ],
)
def test_bad_config_is_a_clear_error(tmp_path, ckpt, config, message):
    net, settings = load_model(ckpt)
    net.save_pretrained(tmp_path / "hf", settings=settings)
    (tmp_path / "hf" / "config.json").write_text(config)
    with pytest.raises(WeightsError, match=message) as error:
        load_model(tmp_path / "hf")
    assert "hf" in str(error.value)
