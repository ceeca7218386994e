"""Networks: attention registry, timm encoder, heads and fusion, and :class:`SkinFusionNet`."""

from skinfusion.nn.attention import (
    CBAM,
    SCSE,
    AttentionModule,
    ChannelAttention,
    SpatialAttention,
    create_attention,
    get_attention,
    list_attention,
    register_attention,
)
from skinfusion.nn.encoder import LoadReport, TimmEncoder
from skinfusion.nn.heads import ClassifierHead, MetaBranch, create_fusion, get_fusion, list_fusion, register_fusion
from skinfusion.nn.net import ATTENTION_PLACEMENTS, SkinFusionNet
from skinfusion.nn.output import SkinFusionOutput

__all__ = [
    "ATTENTION_PLACEMENTS",
    "CBAM",
    "SCSE",
    "AttentionModule",
    "ChannelAttention",
    "ClassifierHead",
    "LoadReport",
    "MetaBranch",
    "SkinFusionNet",
    "SkinFusionOutput",
    "SpatialAttention",
    "TimmEncoder",
    "create_attention",
    "create_fusion",
    "get_attention",
    "get_fusion",
    "list_attention",
    "list_fusion",
    "register_attention",
    "register_fusion",
]
