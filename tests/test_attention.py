"""Attention registry and modules: shapes, maps, gradients, and CBAM against a hand-written reference."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn

from skinfusion.nn import attention as attn_mod
from skinfusion.nn.attention import (
    CBAM,
    SCSE,
    AttentionModule,
    SpatialAttention,
    create_attention,
    get_attention,
    list_attention,
    register_attention,
)

SPATIAL_NAMES = ("spatial", "cbam", "scse")


def test_registry_lists_the_builtin_names():
    assert {"none", "channel", "spatial", "cbam", "scse"} <= set(list_attention())


@pytest.mark.parametrize("name", [None, "", "none", "NONE"])
def test_falsy_or_none_gives_identity(name):
    assert isinstance(create_attention(name, 8), nn.Identity)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="unknown attention 'bogus'.*cbam"):
        create_attention("bogus", 8)


def test_kwarg_the_module_does_not_take_is_a_value_error():
    with pytest.raises(ValueError, match="rd_ratio"):
        create_attention("spatial", 8, rd_ratio=0.5)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register_attention("cbam")(CBAM)


def test_register_a_new_module(monkeypatch):
    monkeypatch.setattr(attn_mod._ATTENTION, "_classes", dict(attn_mod._ATTENTION._classes))

    @register_attention("half")
    class Half(AttentionModule):
        def __init__(self, channels, device=None, dtype=None):
            super().__init__()

        def forward_with_map(self, x):
            return x * 0.5, None

    module = create_attention("half", 4)
    assert isinstance(module, Half)
    assert "half" in list_attention()
    assert torch.equal(module(torch.ones(1, 4, 2, 2)), torch.full((1, 4, 2, 2), 0.5))


@pytest.mark.parametrize("name", ["channel", "spatial", "cbam", "scse"])
def test_shapes_maps_and_gradients(name):
    torch.manual_seed(0)
    module = create_attention(name, 32)
    x = torch.randn(2, 32, 6, 5, requires_grad=True)
    y, attn_map = module.forward_with_map(x)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()
    if name in SPATIAL_NAMES:
        assert attn_map.shape == (2, 1, 6, 5)
        assert ((attn_map >= 0) & (attn_map <= 1)).all()
    else:
        assert attn_map is None
    y.square().sum().backward()
    for pname, param in module.named_parameters():
        assert param.grad is not None, pname
        assert torch.isfinite(param.grad).all(), pname
        assert param.grad.abs().sum() > 0, pname
    # forward() keeps the map for collection from inside timm blocks, pop_map() returns and clears it
    module(x.detach())
    popped = module.pop_map()
    assert (popped is not None) == (name in SPATIAL_NAMES)
    assert module.last_map is None


def test_spatial_attention_hand_computed():
    # kernel 1: map = sigmoid(a * mean_c + b * max_c + c)
    module = SpatialAttention(2, spatial_kernel_size=1)
    with torch.no_grad():
        module.conv.weight.copy_(torch.tensor([1.0, 2.0]).view(1, 2, 1, 1))
        module.conv.bias.fill_(-1.0)
    x = torch.tensor([[[[1.0, -2.0]], [[3.0, 0.0]]]])  # (1,2,1,2): pixel 0 = (1,3), pixel 1 = (-2,0)
    y, attn_map = module.forward_with_map(x)
    # pixel 0: mean 2, max 3 -> 2 + 6 - 1 = 7; pixel 1: mean -1, max 0 -> -1 + 0 - 1 = -2
    expected = torch.tensor([1 / (1 + math.exp(-7)), 1 / (1 + math.exp(2))])
    torch.testing.assert_close(attn_map.flatten(), expected)
    torch.testing.assert_close(y, x * expected.view(1, 1, 1, 2))


def _conv2d_reference(inp, weight, bias):
    """Plain-loop 'same' 2-D convolution of a (C,H,W) input with a (C,k,k) kernel."""
    channels, height, width = inp.shape
    k = weight.shape[-1]
    pad = k // 2
    out = torch.full((height, width), float(bias))
    for i in range(height):
        for j in range(width):
            for c in range(channels):
                for u in range(k):
                    for v in range(k):
                        ii, jj = i + u - pad, j + v - pad
                        if 0 <= ii < height and 0 <= jj < width:
                            out[i, j] += weight[c, u, v] * inp[c, ii, jj]
    return out


def test_cbam_matches_hand_written_reference():
    """CBAM (Woo et al. 2018): F' = M_c(F) * F, F'' = M_s(F') * F'."""
    torch.manual_seed(1)
    channels, hidden = 4, 2
    module = CBAM(channels, rd_channels=hidden)
    w1 = torch.tensor([[0.5, -1.0, 0.25, 0.0], [1.0, 0.5, -0.5, 2.0]])  # (hidden, C)
    w2 = torch.tensor([[1.0, 0.0], [-1.0, 0.5], [0.0, 2.0], [0.5, -0.5]])  # (C, hidden)
    kernel = torch.linspace(-1, 1, 2 * 7 * 7).view(2, 7, 7)
    with torch.no_grad():
        module.channel.fc1.weight.copy_(w1.view(hidden, channels, 1, 1))
        module.channel.fc2.weight.copy_(w2.view(channels, hidden, 1, 1))
        module.spatial.conv.weight.copy_(kernel.view(1, 2, 7, 7))
        module.spatial.conv.bias.fill_(0.1)
    x = torch.randn(1, channels, 5, 4)

    def mlp(v):
        return w2 @ torch.clamp(w1 @ v, min=0)

    feat = x[0]
    avg = feat.mean((1, 2))
    mx = feat.amax((1, 2))
    channel_weights = torch.sigmoid(mlp(avg) + mlp(mx))
    refined = feat * channel_weights[:, None, None]
    pooled = torch.stack([refined.mean(0), refined.amax(0)])
    spatial = torch.sigmoid(_conv2d_reference(pooled, kernel, 0.1))
    expected = refined * spatial[None]

    y, attn_map = module.forward_with_map(x)
    torch.testing.assert_close(y[0], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attn_map[0, 0], spatial, rtol=1e-5, atol=1e-6)


def test_scse_formula():
    torch.manual_seed(2)
    module = SCSE(4, rd_channels=2)
    x = torch.randn(2, 4, 3, 3)
    cse = module.cse(x)  # (B,C,1,1)
    sse = torch.sigmoid(torch.einsum("bchw,c->bhw", x, module.sse[0].weight.view(4)) + module.sse[0].bias).unsqueeze(1)
    y, attn_map = module.forward_with_map(x)
    torch.testing.assert_close(attn_map, sse)
    torch.testing.assert_close(y, x * cse + x * sse)


@pytest.mark.parametrize("name", ["channel", "spatial", "cbam", "scse"])
def test_usable_as_timm_block_attn_layer(name):
    model = timm.create_model("test_resnet", block_args={"attn_layer": get_attention(name)})
    blocks = [m for m in model.modules() if isinstance(m, get_attention(name))]
    assert len(blocks) == 4  # one per residual block of test_resnet (layers (1,1,1,1))
    out = model(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)
