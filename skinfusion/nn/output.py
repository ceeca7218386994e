"""The single output type of every SkinFusion network."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class SkinFusionOutput(NamedTuple):
    """What ``SkinFusionNet.forward`` returns, whatever parts are switched on.

    Attributes:
        mask_logits: (B,1,H,W) lesion logits at input resolution, or ``None`` without a decoder.
        class_logits: (B,K) diagnosis logits, or ``None`` without a classifier.
        attention: every spatial attention map of the forward, name -> (B,1,h,w) in [0,1].
    """

    mask_logits: Tensor | None
    class_logits: Tensor | None
    attention: dict[str, Tensor]
