"""Loading encoder weights from files the tests write: timm state dicts, skinfusion checkpoints, bad files."""

from __future__ import annotations

import pytest
import timm
import torch

from skinfusion.errors import WeightsError
from skinfusion.io import save_safetensors
from skinfusion.nn import SkinFusionNet, TimmEncoder
from skinfusion.nn import encoder as encoder_mod


@pytest.fixture(scope="module")
def classifier_state_dict() -> dict[str, torch.Tensor]:
    """A timm ``test_resnet`` classifier (with its 1000-way ``fc``), randomly initialised with a fixed seed."""
    torch.manual_seed(123)
    model = timm.create_model("test_resnet")
    with torch.no_grad():  # make BatchNorm statistics differ from their defaults, so equality means loaded
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _write(state_dict, path):
    if path.suffix == ".safetensors":
        save_safetensors(state_dict, path)
    else:
        torch.save(state_dict, path)
    return path


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_timm_classifier_file_into_encoder_with_cbam_in_blocks(tmp_path, classifier_state_dict, suffix):
    path = _write(classifier_state_dict, tmp_path / f"test_resnet{suffix}")
    encoder = TimmEncoder("test_resnet", pretrained=str(path), attention="cbam")
    report = encoder.load_report
    attention_keys = sorted(k for k in encoder.model.state_dict() if ".se." in k)
    assert attention_keys  # CBAM parameters exist in every block
    assert sorted(report.new) == attention_keys
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    loaded = encoder.model.state_dict()
    assert sorted(report.loaded) == sorted(k for k in classifier_state_dict if not k.startswith("fc."))
    for key in report.loaded:
        assert torch.equal(loaded[key], classifier_state_dict[key]), key
    assert "new" in str(report) or "newly initialised" in str(report)


def test_plain_encoder_loads_everything(tmp_path, classifier_state_dict):
    path = _write(classifier_state_dict, tmp_path / "w.safetensors")
    encoder = TimmEncoder("test_resnet", pretrained=path)
    assert encoder.load_report.new == []
    assert len(encoder.load_report.loaded) == len(classifier_state_dict) - 2


def test_ddp_prefix_is_removed(tmp_path, classifier_state_dict):
    path = _write({f"module.{k}": v for k, v in classifier_state_dict.items()}, tmp_path / "ddp.pth")
    encoder = TimmEncoder("test_resnet", pretrained=path)
    assert torch.equal(encoder.model.state_dict()["bn1.running_mean"], classifier_state_dict["bn1.running_mean"])


def test_first_conv_adapted_to_one_channel(tmp_path, classifier_state_dict):
    path = _write(classifier_state_dict, tmp_path / "w.pth")
    encoder = TimmEncoder("test_resnet", pretrained=path, in_chans=1)
    expected = classifier_state_dict["conv1.0.weight"].sum(1, keepdim=True)  # timm's adapt_input_conv for 1
    torch.testing.assert_close(encoder.model.state_dict()["conv1.0.weight"], expected)


@pytest.mark.parametrize("prefix", ["net.", "model.net."])
def test_encoder_from_skinfusion_checkpoint(tmp_path, prefix):
    torch.manual_seed(7)
    source = SkinFusionNet("test_resnet", attention="cbam", attention_placement=["encoder", "skip"])
    state = {f"{prefix}{k}": v for k, v in source.state_dict().items()}
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)

    torch.manual_seed(8)
    net = SkinFusionNet("test_resnet", attention="cbam", attention_placement=["encoder", "skip"], pretrained=str(path))
    report = net.load_report
    assert report.new == []  # the checkpoint has the same in-block attention
    assert any(k.startswith(f"{prefix}decoder.") for k in report.ignored)
    for key, value in source.encoder.state_dict().items():
        assert torch.equal(net.encoder.state_dict()[key], value), key
    # only the encoder comes from the checkpoint
    assert not torch.equal(net.segmentation_head[0].weight, source.segmentation_head[0].weight)


def test_checkpoint_without_in_block_attention_lists_the_new_keys(tmp_path):
    source = SkinFusionNet("test_resnet", attention="none")
    path = tmp_path / "plain.ckpt"
    torch.save({"state_dict": {f"net.{k}": v for k, v in source.state_dict().items()}}, path)
    net = SkinFusionNet("test_resnet", attention="cbam", attention_placement=["encoder"], pretrained=str(path))
    assert net.load_report.new
    assert all(".se." in k for k in net.load_report.new)


def test_missing_key_is_named(tmp_path, classifier_state_dict):
    state = dict(classifier_state_dict)
    del state["layer2.0.conv1.weight"]
    path = _write(state, tmp_path / "missing.safetensors")
    with pytest.raises(WeightsError, match=r"missing.*layer2\.0\.conv1\.weight"):
        TimmEncoder("test_resnet", pretrained=path, attention="cbam")


def test_wrong_shape_is_named(tmp_path, classifier_state_dict):
    state = dict(classifier_state_dict)
    state["layer3.0.bn1.weight"] = torch.ones(5)
    path = _write(state, tmp_path / "shape.pth")
    with pytest.raises(WeightsError, match=r"shape.*layer3\.0\.bn1\.weight"):
        TimmEncoder("test_resnet", pretrained=path)


def test_wrong_architecture(tmp_path):
    path = _write(timm.create_model("resnet18").state_dict(), tmp_path / "resnet18.safetensors")
    with pytest.raises(WeightsError, match="does not fit encoder 'test_resnet'"):
        TimmEncoder("test_resnet", pretrained=path)


def test_unexpected_key_is_named(tmp_path, classifier_state_dict):
    state = dict(classifier_state_dict, **{"extra.weight": torch.zeros(3)})
    path = _write(state, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"does not have.*extra\.weight"):
        TimmEncoder("test_resnet", pretrained=path)


def test_not_a_weight_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("not a checkpoint")
    with pytest.raises(WeightsError, match="notes.pth"):
        TimmEncoder("test_resnet", pretrained=path)
    with pytest.raises(WeightsError, match="no such file"):
        TimmEncoder("test_resnet", pretrained=tmp_path / "absent.safetensors")


def test_hub_failure_suggests_a_local_file(monkeypatch):
    real_create = timm.create_model

    def offline_create(name, pretrained=False, **kwargs):
        if pretrained:
            raise OSError("network unreachable")
        return real_create(name, pretrained=False, **kwargs)

    monkeypatch.setattr(encoder_mod.timm, "create_model", offline_create)
    with pytest.raises(WeightsError, match="local file|pretrained='path"):
        TimmEncoder("test_resnet", pretrained=True, attention="cbam")


def test_hub_weights_are_loaded_non_strictly_for_attention(monkeypatch, classifier_state_dict):
    """``pretrained=True`` takes the hub model's state dict (here faked) through the same checked loading."""
    real_create = timm.create_model

    def fake_hub(name, pretrained=False, **kwargs):
        model = real_create(name, pretrained=False, **kwargs)
        if pretrained:
            model.load_state_dict(classifier_state_dict)
        return model

    monkeypatch.setattr(encoder_mod.timm, "create_model", fake_hub)
    encoder = TimmEncoder("test_resnet", pretrained=True, attention="spatial")
    assert encoder.load_report.source.startswith("timm hub")
    assert all(".se." in k for k in encoder.load_report.new)
    assert torch.equal(encoder.model.state_dict()["conv1.0.weight"], classifier_state_dict["conv1.0.weight"])
