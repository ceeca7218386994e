"""SkinFusionNet: the output contract for every combination of parts, attention placements, fusion."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from skinfusion.nn import SkinFusionNet, SkinFusionOutput, TimmEncoder
from skinfusion.nn.attention import AttentionModule
from skinfusion.nn.heads import MaskPoolFusion, create_fusion, list_fusion

ENCODER = "test_resnet"  # levels: channels (32, 32, 48, 192, 96), strides (2, 4, 8, 16, 32)
SIZE = 64
ENCODER_BLOCKS = ("layer1.0", "layer2.0", "layer3.0", "layer4.0")  # test_resnet: one block per stage


def make_net(**kwargs) -> SkinFusionNet:
    torch.manual_seed(0)
    return SkinFusionNet(ENCODER, **kwargs)


def expected_maps(attention: str, placement: list[str]) -> dict[str, tuple[int, ...]]:
    if attention in ("none", "channel"):
        return {}
    maps = {}
    if "encoder" in placement:
        for block, stride in zip(ENCODER_BLOCKS, (4, 8, 16, 32), strict=True):
            maps[f"encoder.{block}"] = (2, 1, SIZE // stride, SIZE // stride)
    if "skip" in placement:
        for level, stride in enumerate((2, 4, 8, 16, 32)):
            maps[f"skip.{level}"] = (2, 1, SIZE // stride, SIZE // stride)
    if "classifier" in placement:
        maps["classifier"] = (2, 1, SIZE // 32, SIZE // 32)
    return maps


PLACEMENTS = [["encoder"], ["skip"], ["classifier"], ["encoder", "skip"], ["encoder", "skip", "classifier"]]


@pytest.mark.parametrize("attention", ["none", "channel", "spatial", "cbam", "scse"])
@pytest.mark.parametrize("placement", PLACEMENTS, ids="+".join)
def test_attention_name_by_placement(attention, placement):
    net = make_net(attention=attention, attention_placement=placement)
    out = net(torch.randn(2, 3, SIZE, SIZE))
    assert isinstance(out, SkinFusionOutput)
    assert out.mask_logits.shape == (2, 1, SIZE, SIZE)
    assert out.class_logits.shape == (2, 7)
    assert {k: tuple(v.shape) for k, v in out.attention.items()} == expected_maps(attention, placement)
    for value in (out.mask_logits, out.class_logits, *out.attention.values()):
        assert torch.isfinite(value).all()
    for attn_map in out.attention.values():
        assert ((attn_map >= 0) & (attn_map <= 1)).all()

    (out.mask_logits.mean() + out.class_logits.mean()).backward()
    attention_modules = [m for m in net.modules() if isinstance(m, AttentionModule)]
    assert bool(attention_modules) == (attention != "none")
    for module in attention_modules:
        grads = [p.grad for p in module.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert sum(g.abs().sum() for g in grads) > 0
    # the in-block maps were handed over, not kept in the modules
    assert all(m.last_map is None for m in attention_modules)


FUSIONS = ["none", "mask_pool", "decoder"]


@pytest.mark.parametrize(
    ("decoder", "classifier", "fusion", "meta_dim"),
    list(itertools.product([True, False], [True, False], FUSIONS, [0, 3])),
)
def test_output_contract(decoder, classifier, fusion, meta_dim):
    kwargs = {
        "attention": "cbam",
        "attention_placement": ["encoder"],
        "decoder": decoder,
        "classifier": classifier,
        "fusion": fusion,
        "meta_dim": meta_dim,
        "num_classes": 5,
    }
    invalid = (
        (not decoder and not classifier)
        or (classifier and not decoder and fusion != "none")
        or (meta_dim and not classifier)
    )
    if invalid:
        with pytest.raises(ValueError, match="decoder|classifier|meta"):
            make_net(**kwargs)
        return
    net = make_net(**kwargs)
    meta = torch.randn(2, meta_dim) if meta_dim else None
    out = net(torch.randn(2, 3, SIZE, SIZE), meta)
    assert (out.mask_logits is None) == (not decoder)
    assert (out.class_logits is None) == (not classifier)
    if decoder:
        assert out.mask_logits.shape == (2, 1, SIZE, SIZE)
    if classifier:
        assert out.class_logits.shape == (2, 5)
    assert set(out.attention) == {f"encoder.{b}" for b in ENCODER_BLOCKS}
    assert (net.decoder is not None) == decoder
    if meta_dim:
        with pytest.raises(ValueError, match="meta"):
            net(torch.randn(2, 3, SIZE, SIZE))


def test_metadata_changes_the_diagnosis_only():
    net = make_net(meta_dim=4, attention="none").eval()
    image = torch.randn(2, 3, SIZE, SIZE)
    a = net(image, torch.zeros(2, 4))
    b = net(image, torch.ones(2, 4))
    torch.testing.assert_close(a.mask_logits, b.mask_logits)
    assert not torch.allclose(a.class_logits, b.class_logits)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decoder": False, "classifier": False}, "both off"),
        ({"decoder": False, "fusion": "mask_pool", "attention": "none"}, "needs the decoder"),
        ({"decoder": False, "fusion": "decoder", "attention": "none"}, "needs the decoder"),
        ({"decoder": False, "fusion": "none", "attention_placement": ["skip"]}, "'skip' needs the decoder"),
        ({"classifier": False, "attention_placement": ["classifier"]}, "needs the classifier"),
        ({"classifier": False, "meta_dim": 3}, "meta_dim"),
        ({"attention_placement": ["head"]}, "unknown attention_placement"),
        ({"attention": "bogus"}, "unknown attention"),
        ({"fusion": "bogus"}, "unknown fusion"),
        ({"decoder_channels": [64, 32, 16]}, "one width per encoder level"),
        ({"num_classes": 0}, "num_classes"),
        ({"meta_dim": -1}, "meta_dim"),
        ({"dropout": 1.5}, "dropout"),
        ({"attention": "spatial", "attention_kwargs": {"rd_ratio": 0.5}}, "rd_ratio"),
    ],
)
def test_invalid_configuration_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_net(**kwargs)


def test_classification_only_head_and_no_attention_when_none():
    net = make_net(decoder=False, attention="none", fusion="none")
    assert net.decoder is None
    assert net.segmentation_head is None
    out = net(torch.randn(1, 3, SIZE, SIZE))
    assert out.mask_logits is None
    assert out.attention == {}


def test_encoder_rejects_in_block_attention_without_block_args():
    with pytest.raises(ValueError, match="cannot take attention inside its blocks"):
        TimmEncoder("convnext_atto", attention="cbam")


def test_encoder_widths_come_from_feature_info():
    encoder = TimmEncoder(ENCODER)
    assert encoder.out_channels == [32, 32, 48, 192, 96]
    assert encoder.reductions == [2, 4, 8, 16, 32]
    features = encoder(torch.randn(1, 3, SIZE, SIZE))
    assert [f.shape[1] for f in features] == encoder.out_channels
    assert [SIZE // f.shape[-1] for f in features] == encoder.reductions


def test_fusion_registry():
    assert set(list_fusion()) == {"none", "mask_pool", "decoder"}
    with pytest.raises(ValueError, match="needs the decoder"):
        create_fusion("mask_pool", 8, None)
    with pytest.raises(ValueError, match="unknown fusion"):
        create_fusion("bogus", 8, 4)


def test_mask_pool_fusion_hand_computed():
    fusion = MaskPoolFusion(2, eps=0.0)
    # features (1,2,2,2): channel 0 = [[1,2],[3,4]], channel 1 = [[0,0],[8,0]]
    features = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [8.0, 0.0]]]])
    # lesion probability at 4x4: top-left 2x2 cell all 1, top-right cell half 1 half 0, bottom cells 0
    probs = torch.zeros(1, 1, 4, 4)
    probs[..., 0:2, 0:2] = 1.0
    probs[..., 0:2, 2] = 1.0
    mask_logits = torch.logit(probs.clamp(1e-7, 1 - 1e-7))
    out = fusion(features, mask_logits, None)
    # cell weights ~ [[1, 0.5], [0, 0]]; channel 0: (1*1 + 2*0.5) / 1.5 = 4/3; channel 1: 0
    expected = torch.tensor([[2.5, 2.0, 4.0 / 3.0, 0.0]])  # [global mean c0, c1, lesion c0, c1]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # an empty predicted mask gives zeros, not NaN
    empty = MaskPoolFusion(2)(features, torch.full((1, 1, 4, 4), -30.0), None)
    assert torch.isfinite(empty).all()


def test_parameter_groups_partition_the_parameters():
    net = make_net(attention="cbam", attention_placement=["encoder", "skip", "classifier"])
    encoder_ids = {id(p) for p in net.encoder_parameters()}
    head_ids = {id(p) for p in net.head_parameters()}
    assert not encoder_ids & head_ids
    assert encoder_ids | head_ids == {id(p) for p in net.parameters()}
    # in-block attention is new: it goes with the heads, not with the (pretrained) encoder
    in_block = {id(p) for path, m in net.encoder.attention_modules.items() for p in m.parameters()}
    assert in_block
    assert in_block <= head_ids


def test_freeze_encoder_keeps_batchnorm_in_eval():
    net = make_net(attention="cbam", attention_placement=["encoder"])
    net.freeze_encoder()
    net.train()
    assert not any(p.requires_grad for p in net.encoder_parameters())
    assert all(p.requires_grad for m in net.encoder.attention_modules.values() for p in m.parameters())
    batchnorms = [m for m in net.encoder.modules() if isinstance(m, nn.BatchNorm2d)]
    assert batchnorms
    assert not any(m.training for m in batchnorms)
    assert net.decoder.training
    net.freeze_encoder(False)
    net.train()
    assert all(p.requires_grad for p in net.parameters())
    assert all(m.training for m in batchnorms)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace`:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace_method`:FutureWarning")
def test_trace_matches_eager():
    net = make_net(attention="cbam", attention_placement=["encoder", "skip", "classifier"]).eval()

    class Flat(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, image):
            out = self.inner(image)
            return out.mask_logits, out.class_logits, out.attention

    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        traced = torch.jit.trace(Flat(net), image, strict=False)
        eager = Flat(net)(image)
        other = torch.randn(1, 3, SIZE, SIZE)
        torch.testing.assert_close(traced(other)[0], Flat(net)(other)[0])
        torch.testing.assert_close(traced(other)[2], Flat(net)(other)[2])
    assert set(eager[2]) == set(traced(image)[2])


def test_torch_export_matches_eager():
    """No data-dependent control flow: torch.export captures every placement, in-block maps included."""
    net = make_net(attention="cbam", attention_placement=["encoder", "skip", "classifier"]).eval()
    exported = torch.export.export(net, (torch.randn(1, 3, SIZE, SIZE),))
    image = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        ours, ref = exported.module()(image), net(image)
    torch.testing.assert_close(ours.mask_logits, ref.mask_logits)
    torch.testing.assert_close(ours.class_logits, ref.class_logits)
    assert set(ours.attention) == set(ref.attention)
    for key in ref.attention:
        torch.testing.assert_close(ours.attention[key], ref.attention[key])


def test_resnet50_at_224_with_attention_everywhere():
    """The paper's backbone: real ResNet-50 (no weights), CBAM in blocks, on skips and before the classifier."""
    net = SkinFusionNet("resnet50", attention="cbam", attention_placement=["encoder", "skip", "classifier"]).eval()
    with torch.no_grad():
        out = net(torch.randn(1, 3, 224, 224))
    assert out.mask_logits.shape == (1, 1, 224, 224)
    assert out.class_logits.shape == (1, 7)
    assert len([k for k in out.attention if k.startswith("encoder.")]) == 16  # 3 + 4 + 6 + 3 bottlenecks
    assert out.attention["encoder.layer4.2"].shape == (1, 1, 7, 7)
    assert out.attention["skip.0"].shape == (1, 1, 112, 112)
    assert out.attention["classifier"].shape == (1, 1, 7, 7)


def test_resnet50_baseline_parameter_count():
    """Baseline = ResNet-50 without its 1000-way fc (25,557,032 - 2,049,000) + a 2048 -> 7 linear layer."""
    net = SkinFusionNet("resnet50", attention="none", decoder=False, fusion="none")
    assert sum(p.numel() for p in net.parameters()) == 25_557_032 - 2_049_000 + 2048 * 7 + 7
    assert math.isclose(sum(p.numel() for p in net.encoder.parameters()), 23_508_032)
