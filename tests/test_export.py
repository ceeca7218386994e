"""skinfusion.inference.export: ONNX Runtime and TorchScript equal eager PyTorch (any batch); safetensors round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from imgutil import rgb, save
from modelutil import ATTENTION_NAMES, IMAGE_SIZE, NET_CONFIG, make_module, save_ckpt
from safetensors import safe_open

from skinfusion.data.records import ISIC_CLASSES
from skinfusion.inference.export import (
    export_main,
    export_onnx,
    export_safetensors,
    export_torchscript,
    load_safetensors_export,
)
from skinfusion.inference.predictor import Predictor
from skinfusion.io import InferenceSettings

OUTPUT_NAMES = ["mask_logits", "class_logits", *(f"attn/{n}" for n in ATTENTION_NAMES)]
META_DIM = 5


def eager(net, image, meta=None):
    with torch.no_grad():
        out = net(image, meta)
    return {
        "mask_logits": out.mask_logits,
        "class_logits": out.class_logits,
        **{f"attn/{k}": v for k, v in out.attention.items()},
    }


@pytest.fixture(scope="module")
def meta_net():
    """The tiny network with a metadata branch (so the exports take a second input)."""
    return make_module(seed=1, meta_dim=META_DIM).net.eval()


def settings(net, **changes) -> InferenceSettings:
    """The record of ``net`` trained at 64 px."""
    return InferenceSettings(
        **{"net_config": net.config, "class_names": ISIC_CLASSES, "image_size": IMAGE_SIZE, **changes}
    )


def batch(n: int, meta: bool = True):
    generator = torch.Generator().manual_seed(n)
    image = torch.randn(n, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return image, torch.rand(n, META_DIM, generator=generator) if meta else None


def test_onnx_matches_eager_with_dynamic_batch(tmp_path, meta_net):
    import onnx
    import onnxruntime

    names = export_onnx(meta_net, tmp_path / "net.onnx", settings(meta_net, normalization="unit"), batch_size=2)
    assert names == OUTPUT_NAMES
    model = onnx.load(str(tmp_path / "net.onnx"))
    assert max(op.version for op in model.opset_import if op.domain in ("", "ai.onnx")) >= 17
    session = onnxruntime.InferenceSession(str(tmp_path / "net.onnx"), providers=["CPUExecutionProvider"])
    recorded = InferenceSettings.from_metadata(session.get_modelmeta().custom_metadata_map)
    assert recorded == settings(meta_net, normalization="unit")  # the model's record travels with the file
    assert [i.name for i in session.get_inputs()] == ["image", "meta"]
    assert [o.name for o in session.get_outputs()] == OUTPUT_NAMES
    for n in (3, 1):  # batch sizes other than the export's
        image, meta = batch(n)
        expected = eager(meta_net, image, meta)
        got = session.run(None, {"image": image.numpy(), "meta": meta.numpy()})
        for name, value in zip(OUTPUT_NAMES, got, strict=True):
            assert value.shape == tuple(expected[name].shape)
            np.testing.assert_allclose(value, expected[name].numpy(), atol=1e-4, rtol=1e-4, err_msg=name)


def test_torchscript_matches_eager_with_dynamic_batch(tmp_path, meta_net):
    names = export_torchscript(meta_net, tmp_path / "net.pt", settings(meta_net), batch_size=2)
    assert names == OUTPUT_NAMES
    extra = {"skinfusion.json": ""}
    traced = torch.jit.load(str(tmp_path / "net.pt"), _extra_files=extra)
    assert json.loads(extra["skinfusion.json"])["output_names"] == OUTPUT_NAMES
    assert json.loads(extra["skinfusion.json"])["image_size"] == IMAGE_SIZE
    image, meta = batch(3)
    expected = eager(meta_net, image, meta)
    with torch.no_grad():
        got = traced(image, meta)
    for name, value in zip(OUTPUT_NAMES, got, strict=True):
        torch.testing.assert_close(value, expected[name], atol=1e-4, rtol=1e-4)


def test_safetensors_round_trip(tmp_path):
    module = make_module(seed=2)
    metadata = export_safetensors(module.net, tmp_path / "net.safetensors", settings(module.net))
    with safe_open(str(tmp_path / "net.safetensors"), framework="pt") as handle:
        stored = handle.metadata()
    assert stored == metadata
    config = json.loads(stored["net_config"])
    assert config == {k: v for k, v in module.net.config.items() if k != "pretrained"}
    assert {k: config[k] for k in NET_CONFIG} == NET_CONFIG
    assert json.loads(stored["class_names"]) == list(module.class_names)

    net, recorded = load_safetensors_export(tmp_path / "net.safetensors")
    assert list(recorded.class_names) == list(module.class_names)
    assert (recorded.image_size, recorded.normalization) == (IMAGE_SIZE, "imagenet")
    image, _ = batch(2, meta=False)
    for name, value in eager(net, image).items():
        torch.testing.assert_close(value, eager(module.net.eval(), image)[name])

    # the Predictor takes the export as its model, with the recorded input settings
    save(tmp_path / "in" / "a.png", rgb(50, 30))
    from_export = next(Predictor(tmp_path / "net.safetensors", progress=False).predict_paths(tmp_path / "in"))
    from_module = next(Predictor(module, image_size=IMAGE_SIZE, progress=False).predict_paths(tmp_path / "in"))
    np.testing.assert_allclose(from_export.probabilities, from_module.probabilities, atol=1e-6)
    np.testing.assert_array_equal(from_export.mask, from_module.mask)


def test_export_arguments_are_checked(tmp_path, meta_net):
    with pytest.raises(ValueError, match="opset"):
        export_onnx(meta_net, tmp_path / "x.onnx", settings(meta_net), opset=13)
    with pytest.raises(ValueError, match="image_size"):
        export_torchscript(meta_net, tmp_path / "x.pt", settings(meta_net, image_size=0))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "safetensors"])
def test_export_main_cli(tmp_path, fmt, capsys):
    ckpt = save_ckpt(tmp_path / "m.ckpt", make_module(seed=3))
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}[fmt]
    out = export_main(["--ckpt", str(ckpt), "--format", fmt, "--out", str(tmp_path / f"model{suffix}")])
    assert out.is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]  # no temporary file left
    printed = capsys.readouterr().out
    if fmt != "safetensors":
        assert "attn/classifier" in printed
        assert "max |exported - eager|" in printed  # verified on a batch of 3
    else:
        with safe_open(str(out), framework="pt") as handle:
            assert json.loads(handle.metadata()["image_size"]) == IMAGE_SIZE  # from the checkpoint


def test_classifier_only_network_exports_without_mask(tmp_path):
    net = make_module(seed=4, decoder=False, fusion="none", attention_placement=["classifier"]).net.eval()
    names = export_torchscript(net, tmp_path / "cls.pt", settings(net))
    assert names == ["class_logits", "attn/classifier"]
    image, _ = batch(3, meta=False)
    with torch.no_grad():
        got = torch.jit.load(str(tmp_path / "cls.pt"))(image)
    torch.testing.assert_close(got[0], eager(net, image)["class_logits"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_input_channels_come_from_the_network(tmp_path, fmt):
    """A 1-channel network is exported with a 1-channel input (not the usual 3)."""
    net = make_module(seed=5, in_chans=1).net.eval()
    export = export_onnx if fmt == "onnx" else export_torchscript
    export(net, tmp_path / f"grey.{fmt}", settings(net))
    image = torch.randn(2, 1, IMAGE_SIZE, IMAGE_SIZE)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(tmp_path / "grey.onnx"), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[1] == 1
        got = session.run(None, {"image": image.numpy()})[1]
    else:
        with torch.no_grad():
            got = torch.jit.load(str(tmp_path / "grey.torchscript"))(image)[1].numpy()
    np.testing.assert_allclose(got, eager(net, image)["class_logits"].numpy(), atol=1e-4, rtol=1e-4)
