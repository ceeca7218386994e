"""Attention modules chosen by name: CBAM and its parts, and scSE.

* CBAM: Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018 (https://arxiv.org/abs/1807.06521):
  ``M_c = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F)))``, then ``M_s = sigmoid(conv7x7([mean_c(F); max_c(F)]))``.
* scSE: Roy et al., "Concurrent Spatial and Channel Squeeze & Excitation in Fully Convolutional Networks",
  MICCAI 2018 (https://arxiv.org/abs/1803.02579).

Every module takes the channel count first, timm's argument names (``rd_ratio``, ``rd_divisor``,
``rd_channels``, ``spatial_kernel_size``, ``act_layer``, ``gate_layer``) and ``device``/``dtype``, so a
registry class (or a ``functools.partial`` of it) can be a timm ResNet's ``block_args=dict(attn_layer=...)``.

A module with a spatial map (``has_spatial_map = True``) returns it from ``forward_with_map(x) -> (y, map)``
(a pure function, for tracing and export); ``forward(x)`` also keeps it in ``last_map`` (B,1,h,w), because
inside a timm block only the gated features can be returned; the network reads and clears it (``pop_map``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import create_act_layer, make_divisible
from torch import Tensor, nn

from skinfusion.registry import Registry

__all__ = [
    "CBAM",
    "AttentionModule",
    "ChannelAttention",
    "SCSE",
    "SpatialAttention",
    "create_attention",
    "get_attention",
    "list_attention",
    "register_attention",
]

_ATTENTION: Registry[nn.Module] = Registry("attention")

LayerType = str | Callable[..., nn.Module] | type[nn.Module]

#: Class decorator adding an attention module (channel count first), e.g. ``@register_attention("eca")``.
register_attention = _ATTENTION.register
#: Names accepted by :func:`create_attention` (``"none"`` included), sorted.
list_attention = _ATTENTION.names


def get_attention(name: str | None) -> type[nn.Module] | None:
    """The registered class for ``name``; ``None`` for a falsy name or ``"none"``.

    Raises:
        ValueError: unknown name (the message lists the choices).
    """
    cls = _ATTENTION.get(name) if name else None
    return None if cls is nn.Identity else cls


def check_attention_kwargs(name: str | None, kwargs: dict[str, Any] | None) -> None:
    """Raise ``ValueError`` when ``kwargs`` holds an argument the attention ``name`` does not take."""
    cls = get_attention(name)
    if cls is None or not kwargs:
        return
    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params) - {"self"})
    if unknown:
        accepted = sorted(k for k in params if k not in ("self", "channels", "device", "dtype"))
        raise ValueError(f"attention {name!r} takes no argument {unknown}; it accepts {accepted}")


def create_attention(name: str | None, channels: int, **kwargs: Any) -> nn.Module:
    """Build the attention module ``name`` (falsy or ``"none"``: ``nn.Identity()``) for ``channels`` channels.

    Raises:
        ValueError: unknown name, or an argument the module does not take.
    """
    cls = get_attention(name)
    if cls is None:
        return nn.Identity()
    check_attention_kwargs(name, kwargs)
    return cls(channels, **kwargs)


register_attention("none")(nn.Identity)


def _rd_channels(channels: int, rd_ratio: float, rd_channels: int | None, rd_divisor: int) -> int:
    """Hidden width of a channel MLP: ``rd_channels``, else ``channels * rd_ratio`` rounded to ``rd_divisor``."""
    return rd_channels or make_divisible(channels * rd_ratio, rd_divisor, round_limit=0.0)


class AttentionModule(nn.Module):
    """Base of the registry's modules: ``forward`` gates ``x``; a spatial map, if any, goes to ``last_map``."""

    has_spatial_map: bool = False

    def __init__(self) -> None:
        super().__init__()
        self.last_map: Tensor | None = None

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Return the gated features and the spatial map (B,1,h,w), or ``None`` without one."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        y, attn_map = self.forward_with_map(x)
        if self.has_spatial_map:
            self.last_map = attn_map
        return y

    def pop_map(self) -> Tensor | None:
        """Return the map of the last ``forward`` and forget it (so the module holds no graph or state)."""
        attn_map, self.last_map = self.last_map, None
        return attn_map


@register_attention("channel")
class ChannelAttention(AttentionModule):
    """CBAM channel attention: a shared MLP on average- and max-pooled features, summed, then gated.

    Args:
        rd_ratio: hidden width of the MLP as a fraction of ``channels`` (CBAM's reduction ``r = 16``).
        rd_channels: hidden width, overriding ``rd_ratio``.
        rd_divisor: round the hidden width to a multiple of this.
        act_layer, gate_layer: activation of the MLP and gate (names or classes).
        mlp_bias: biases in the MLP.
    """

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        act_layer: LayerType = "relu",
        gate_layer: LayerType = "sigmoid",
        mlp_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        rd_channels = _rd_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=mlp_bias, **dd)
        self.act = create_act_layer(act_layer, inplace=True)
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=mlp_bias, **dd)
        self.gate = create_act_layer(gate_layer)

    def channel_weights(self, x: Tensor) -> Tensor:
        """Channel weights (B,C,1,1) in [0,1]."""
        avg = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        mx = self.fc2(self.act(self.fc1(x.amax((2, 3), keepdim=True))))
        return self.gate(avg + mx)

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        return x * self.channel_weights(x), None


@register_attention("spatial")
class SpatialAttention(AttentionModule):
    """CBAM spatial attention: ``gate(conv_kxk([mean over channels; max over channels]))``, map (B,1,H,W).

    The convolution has a bias and no normalisation, as in the paper's equation (timm's variant adds a
    BatchNorm); ``channels`` is only taken for a uniform registry signature. ``spatial_kernel_size``: odd, 7 in CBAM.
    """

    has_spatial_map = True

    def __init__(
        self,
        channels: int,
        spatial_kernel_size: int = 7,
        gate_layer: LayerType = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if spatial_kernel_size < 1 or spatial_kernel_size % 2 == 0:
            raise ValueError(f"spatial_kernel_size must be a positive odd number, got {spatial_kernel_size}")
        self.conv = nn.Conv2d(
            2, 1, spatial_kernel_size, padding=spatial_kernel_size // 2, bias=True, device=device, dtype=dtype
        )
        self.gate = create_act_layer(gate_layer)

    def spatial_map(self, x: Tensor) -> Tensor:
        """Spatial weights (B,1,H,W)."""
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return self.gate(self.conv(pooled))

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        attn_map = self.spatial_map(x)
        return x * attn_map, attn_map


@register_attention("cbam")
class CBAM(AttentionModule):
    """Convolutional Block Attention Module: :class:`ChannelAttention`, then :class:`SpatialAttention`.

    The arguments are those of the two parts; ``gate_layer`` gates both.
    """

    has_spatial_map = True

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        spatial_kernel_size: int = 7,
        act_layer: LayerType = "relu",
        gate_layer: LayerType = "sigmoid",
        mlp_bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channel = ChannelAttention(
            channels, rd_ratio, rd_channels, rd_divisor, act_layer, gate_layer, mlp_bias, **dd
        )
        self.spatial = SpatialAttention(channels, spatial_kernel_size=spatial_kernel_size, gate_layer=gate_layer, **dd)

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        x, _ = self.channel.forward_with_map(x)
        return self.spatial.forward_with_map(x)


@register_attention("scse")
class SCSE(AttentionModule):
    """Concurrent spatial and channel squeeze & excitation: ``x * cSE(x) + x * sSE(x)``; the map is ``sSE(x)``.

    ``rd_*`` and ``act_layer`` shape the channel excitation as in :class:`ChannelAttention`; ``gate_layer``
    gates both branches.
    """

    has_spatial_map = True

    def __init__(
        self,
        channels: int,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        act_layer: LayerType = "relu",
        gate_layer: LayerType = "sigmoid",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        rd_channels = _rd_channels(channels, rd_ratio, rd_channels, rd_divisor)
        self.cse = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(channels, rd_channels, 1, **dd),
            create_act_layer(act_layer, inplace=True),
            nn.Conv2d(rd_channels, channels, 1, **dd),
            create_act_layer(gate_layer),
        )
        self.sse = nn.Sequential(nn.Conv2d(channels, 1, 1, **dd), create_act_layer(gate_layer))

    def forward_with_map(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        attn_map = self.sse(x)
        return x * self.cse(x) + x * attn_map, attn_map
