"""Classification head, clinical-metadata branch and the fusion of segmentation into classification.

A fusion module turns the deepest encoder features (and, for some modes, the decoder's outputs) into one
feature vector for the classifier. Modes are chosen by name from a registry:

* ``none``: global average pooling of the deepest encoder features (shared encoder only).
* ``mask_pool``: the deepest features pooled with the decoder's lesion probability as weights
  (``sum(p * f) / sum(p)``, ``p = sigmoid(mask_logits)`` resized to the feature grid), concatenated with their
  global average, so the classifier sees the lesion and its context.
* ``decoder``: global average of the deepest encoder features concatenated with the global average of the
  decoder's last features.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from skinfusion.registry import Registry

__all__ = [
    "ClassifierHead",
    "DecoderFusion",
    "Fusion",
    "MaskPoolFusion",
    "MetaBranch",
    "NoFusion",
    "create_fusion",
    "get_fusion",
    "list_fusion",
    "register_fusion",
]

_FUSION: Registry[Fusion] = Registry("fusion")
#: Class decorator adding a fusion mode, e.g. ``@register_fusion("mask_pool")``.
register_fusion = _FUSION.register
#: Names accepted by :func:`create_fusion`, sorted.
list_fusion = _FUSION.names


def get_fusion(name: str | None) -> type[Fusion]:
    """The fusion class for ``name`` (a falsy name means ``"none"``); ``ValueError`` for an unknown one."""
    return _FUSION.get(name or "none")


def create_fusion(name: str | None, encoder_channels: int, decoder_channels: int | None, **kwargs: Any) -> Fusion:
    """Build the fusion mode ``name`` for the deepest encoder features and the decoder's last ones (or ``None``).

    Raises:
        ValueError: unknown name, or a mode that needs the decoder when there is none.
    """
    cls = get_fusion(name)
    if cls.needs_decoder and decoder_channels is None:
        raise ValueError(f"fusion {name!r} needs the decoder; set decoder=True or fusion='none'")
    return cls(encoder_channels, decoder_channels, **kwargs)


class Fusion(nn.Module):
    """Base of the fusion modes: ``forward(features, mask_logits, decoder_features) -> (B, out_features)``.

    Shapes: features (B,C,h,w); mask_logits (B,1,H,W) and decoder_features (B,D,H,W), read only by a mode that
    ``needs_decoder``.
    """

    needs_decoder: bool = False
    out_features: int

    def forward(self, features: Tensor, mask_logits: Tensor | None, decoder_features: Tensor | None) -> Tensor:
        raise NotImplementedError


@register_fusion("none")
class NoFusion(Fusion):
    """Global average pooling of the deepest encoder features."""

    def __init__(self, encoder_channels: int, decoder_channels: int | None = None) -> None:
        super().__init__()
        self.out_features = encoder_channels

    def forward(self, features: Tensor, mask_logits: Tensor | None, decoder_features: Tensor | None) -> Tensor:
        return features.mean((2, 3))


@register_fusion("mask_pool")
class MaskPoolFusion(Fusion):
    """Lesion-weighted pooling of the deepest features (from the predicted mask) joined to global pooling.

    Args:
        detach_mask: stop the classifier's gradient from flowing into the segmentation branch.
        eps: added to the sum of weights (an empty predicted mask gives a zero lesion vector, not NaN).
    """

    needs_decoder = True

    def __init__(
        self, encoder_channels: int, decoder_channels: int | None = None, detach_mask: bool = False, eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.out_features = 2 * encoder_channels
        self.detach_mask = detach_mask
        self.eps = eps

    def forward(self, features: Tensor, mask_logits: Tensor | None, decoder_features: Tensor | None) -> Tensor:
        if self.detach_mask:
            mask_logits = mask_logits.detach()
        # "area" averages the probability over each feature cell; it is exact for the integer strides here.
        weights = F.interpolate(torch.sigmoid(mask_logits), size=features.shape[-2:], mode="area")
        lesion = (features * weights).sum((2, 3)) / (weights.sum((2, 3)) + self.eps)
        return torch.cat([features.mean((2, 3)), lesion], dim=1)


@register_fusion("decoder")
class DecoderFusion(Fusion):
    """Global average of the deepest encoder features joined to the global average of the decoder output."""

    needs_decoder = True

    def __init__(self, encoder_channels: int, decoder_channels: int | None = None) -> None:
        super().__init__()
        self.out_features = encoder_channels + decoder_channels

    def forward(self, features: Tensor, mask_logits: Tensor | None, decoder_features: Tensor | None) -> Tensor:
        return torch.cat([features.mean((2, 3)), decoder_features.mean((2, 3))], dim=1)


class MetaBranch(nn.Sequential):
    """Small MLP encoding clinical metadata (age, sex, site, ...) for the classifier: (B, meta_dim) -> (B, hidden)."""

    def __init__(self, meta_dim: int, hidden: int = 64, dropout: float = 0.0) -> None:
        if meta_dim < 1:
            raise ValueError(f"meta_dim must be positive, got {meta_dim}")
        super().__init__(
            nn.Linear(meta_dim, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
        )
        self.out_features = hidden


class ClassifierHead(nn.Module):
    """Dropout, an optional hidden layer of width ``hidden`` (0: none), and the linear classifier.

    ``dropout`` is applied before each linear layer.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 0, dropout: float = 0.2) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        layers: list[nn.Module] = []
        if hidden:
            layers += [nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(inplace=True)]
            in_features = hidden
        layers += [nn.Dropout(dropout), nn.Linear(in_features, num_classes)]
        self.mlp = nn.Sequential(*layers)

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features)
