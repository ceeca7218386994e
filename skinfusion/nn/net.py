"""SkinFusionNet: one timm encoder shared by a U-Net decoder (lesion mask) and a classifier (diagnosis).

Encoder -> (attention on skips) -> smp U-Net decoder -> segmentation head, and encoder -> (attention) ->
fusion with the decoder's lesion estimate (+ clinical metadata) -> classifier. Each part can be switched
off, which gives the paper's ablation: baseline (classifier only), +attention, +encoder-decoder fusion, full.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.base.initialization import initialize_decoder, initialize_head
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import Tensor, nn

from skinfusion.nn.attention import AttentionModule, check_attention_kwargs, create_attention, get_attention
from skinfusion.nn.encoder import LoadReport, TimmEncoder
from skinfusion.nn.heads import ClassifierHead, MetaBranch, create_fusion
from skinfusion.nn.hub import SkinFusionHubMixin
from skinfusion.nn.late_fusion import MetadataLateFusion
from skinfusion.nn.output import SkinFusionOutput

__all__ = ["ATTENTION_PLACEMENTS", "META_FUSIONS", "SkinFusionNet", "plain_config"]


def plain_config(arguments: dict[str, Any]) -> dict[str, Any]:
    """Constructor arguments (``locals()`` at the top of ``__init__``) as plain YAML/JSON values."""

    def plain(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.tolist()
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if value is None or isinstance(value, bool | int | float | str):
            return value
        return str(value)

    return {k: plain(v) for k, v in arguments.items() if k not in ("self", "__class__")}


ATTENTION_PLACEMENTS = ("encoder", "skip", "classifier")
#: How the diagnosis reads clinical metadata (``meta_fusion``): a feature branch, or late fusion.
META_FUSIONS = ("features", "late")


class SkinFusionNet(nn.Module, SkinFusionHubMixin):
    """Joint lesion segmentation and diagnosis network (``save_pretrained``/``from_pretrained``: see the hub module).

    Args:
        encoder: timm model name (``"resnet50"`` as in the paper; ``"test_resnet"`` for tests).
        pretrained: ``False``, ``True`` (timm hub), or a path to a weight file or an earlier skinfusion
            checkpoint (see :class:`~skinfusion.nn.encoder.TimmEncoder`).
        attention: attention registry name (``"cbam"``, ``"spatial"``, ``"channel"``, ``"scse"``) or
            ``None``/``"none"``.
        attention_placement: where the attention goes, any of ``"encoder"`` (inside every residual block of
            the encoder), ``"skip"`` (on each encoder feature level given to the decoder; needs the
            decoder), ``"classifier"`` (on the deepest features before pooling; needs the classifier).
        attention_kwargs: arguments of the attention modules (``rd_ratio``, ``spatial_kernel_size``, ...).
        decoder: build the U-Net decoder and segmentation head (``False``: classification only).
        decoder_channels: widths of the decoder blocks, one per encoder level (deepest first).
        classifier: build the classification head (``False``: segmentation only).
        fusion: how the classifier reads the segmentation branch: ``"none"``, ``"mask_pool"``, ``"decoder"``
            (see :mod:`skinfusion.nn.heads`). Unused without a classifier.
        fusion_kwargs: arguments of the fusion module (e.g. ``detach_mask=True`` for ``mask_pool``).
        meta_dim: width of the clinical metadata vector; 0 for no metadata branch.
        meta_fusion: how the diagnosis reads the metadata (with ``meta_dim > 0``): ``"features"``, a
            :class:`~skinfusion.nn.heads.MetaBranch` whose features join the classifier's input (trained end to
            end); ``"late"``, an image-only network plus a metadata model
            (:class:`~skinfusion.nn.late_fusion.MetadataLateFusion`, fitted on the training split's metadata when
            training starts) whose log-likelihood ratio is added to the logits at inference (eval mode) for the
            images whose metadata is known. ``"late"`` cannot learn "metadata missing" as a data set's label.
        meta_hidden, classifier_hidden, dropout: see :class:`~skinfusion.nn.heads.MetaBranch` and
            :class:`~skinfusion.nn.heads.ClassifierHead` (``classifier_hidden=0``: a linear classifier).

    Raises:
        ValueError: an unknown name or placement, or parts that do not go together (e.g. ``fusion="mask_pool"``
            without a decoder, ``"skip"`` attention without a decoder, neither decoder nor classifier).

    Shape:
        forward: image (B,in_chans,H,W), meta (B,meta_dim) -> ``SkinFusionOutput`` with mask_logits (B,1,H,W),
        class_logits (B,num_classes) and attention maps (B,1,h,w) named ``encoder.<block>`` (e.g.
        ``encoder.layer3.2``), ``skip.<level>`` (level 0 = stride 2) and ``classifier``.
    """

    def __init__(
        self,
        encoder: str = "resnet50",
        pretrained: bool | str = False,
        in_chans: int = 3,
        attention: str | None = "cbam",
        attention_placement: Sequence[str] = ("skip",),
        attention_kwargs: dict[str, Any] | None = None,
        decoder: bool = True,
        decoder_channels: Sequence[int] = (256, 128, 64, 32, 16),
        classifier: bool = True,
        fusion: str = "mask_pool",
        fusion_kwargs: dict[str, Any] | None = None,
        num_classes: int = 7,
        meta_dim: int = 0,
        meta_fusion: str = "features",
        meta_hidden: int = 64,
        classifier_hidden: int = 0,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        #: The constructor arguments as plain values: enough to rebuild this network (checkpoints store it).
        self.config: dict[str, Any] = plain_config(locals())
        if isinstance(attention_placement, str):
            attention_placement = [attention_placement]
        placement = set(attention_placement)
        unknown = sorted(placement - set(ATTENTION_PLACEMENTS))
        if unknown:
            raise ValueError(f"unknown attention_placement {unknown}; choose from {list(ATTENTION_PLACEMENTS)}")
        has_attention = get_attention(attention) is not None
        check_attention_kwargs(attention, attention_kwargs)
        if not decoder and not classifier:
            raise ValueError("decoder and classifier are both off: the network would output nothing")
        if has_attention and "skip" in placement and not decoder:
            raise ValueError("attention_placement 'skip' needs the decoder; use 'encoder' or 'classifier'")
        if has_attention and "classifier" in placement and not classifier:
            raise ValueError("attention_placement 'classifier' needs the classifier; use 'encoder' or 'skip'")
        if meta_dim < 0:
            raise ValueError(f"meta_dim must be >= 0, got {meta_dim}")
        if meta_dim and not classifier:
            raise ValueError("meta_dim > 0 needs the classifier (metadata only feeds the diagnosis)")
        if meta_fusion not in META_FUSIONS:
            raise ValueError(f"unknown meta_fusion {meta_fusion!r}; choose one of {list(META_FUSIONS)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")

        attention_kwargs = dict(attention_kwargs or {})
        self.attention_placement = tuple(p for p in ATTENTION_PLACEMENTS if p in placement) if has_attention else ()
        self.encoder = TimmEncoder(
            encoder,
            pretrained=pretrained,
            in_chans=in_chans,
            attention=attention if "encoder" in self.attention_placement else None,
            attention_kwargs=attention_kwargs,
        )
        channels = self.encoder.out_channels

        self.skip_attention: nn.ModuleList | None = None
        self.decoder: UnetDecoder | None = None
        self.segmentation_head: nn.Module | None = None
        if decoder:
            decoder_channels = list(decoder_channels)
            if len(decoder_channels) != self.encoder.depth:
                raise ValueError(
                    f"decoder_channels needs one width per encoder level ({self.encoder.depth} for {encoder!r}), "
                    f"got {decoder_channels}"
                )
            skip_name = attention if "skip" in self.attention_placement else None
            self.skip_attention = nn.ModuleList(create_attention(skip_name, c, **attention_kwargs) for c in channels)
            # smp's decoder drops its first input (the input-resolution level) and uses only its size.
            self.decoder = UnetDecoder(
                encoder_channels=[in_chans, *channels], decoder_channels=decoder_channels, n_blocks=len(channels)
            )
            self._decoder_varargs = any(
                p.kind is inspect.Parameter.VAR_POSITIONAL
                for p in inspect.signature(self.decoder.forward).parameters.values()
            )
            self.segmentation_head = SegmentationHead(decoder_channels[-1], 1, kernel_size=3)
            initialize_decoder(self.decoder)
            initialize_head(self.segmentation_head)

        self.classifier_attention: nn.Module | None = None
        self.fusion: nn.Module | None = None
        self.meta: MetaBranch | None = None
        self.late_fusion: MetadataLateFusion | None = None
        self.classifier: ClassifierHead | None = None
        if classifier:
            cls_name = attention if "classifier" in self.attention_placement else None
            self.classifier_attention = create_attention(cls_name, channels[-1], **attention_kwargs)
            self.fusion = create_fusion(
                fusion, channels[-1], decoder_channels[-1] if decoder else None, **(fusion_kwargs or {})
            )
            in_features = self.fusion.out_features
            if meta_dim and meta_fusion == "late":
                self.late_fusion = MetadataLateFusion.for_encoded_metadata(meta_dim, num_classes)
            elif meta_dim:
                self.meta = MetaBranch(meta_dim, hidden=meta_hidden, dropout=dropout)
                in_features += self.meta.out_features
            self.classifier = ClassifierHead(in_features, num_classes, hidden=classifier_hidden, dropout=dropout)
            initialize_head(self.classifier)
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.meta_dim = meta_dim
        self.meta_fusion = meta_fusion

    @property
    def has_decoder(self) -> bool:
        return self.decoder is not None

    @property
    def has_classifier(self) -> bool:
        return self.classifier is not None

    @property
    def load_report(self) -> LoadReport | None:
        """The encoder's :class:`~skinfusion.nn.encoder.LoadReport` when pretrained weights were loaded."""
        return self.encoder.load_report

    def forward(self, image: Tensor, meta: Tensor | None = None) -> SkinFusionOutput:
        """Segment and classify normalised images; ``meta`` is required when ``meta_dim > 0``, ignored otherwise."""
        features = self.encoder(image)
        attention: dict[str, Tensor] = {}
        if "encoder" in self.attention_placement:
            attention.update({f"encoder.{k}": v for k, v in self.encoder.pop_attention_maps().items()})

        mask_logits = decoder_features = None
        if self.decoder is not None:
            skips = []
            for level, (feature, module) in enumerate(zip(features, self.skip_attention, strict=True)):
                feature, attn_map = _apply_attention(module, feature)
                if attn_map is not None:
                    attention[f"skip.{level}"] = attn_map
                skips.append(feature)
            decoder_input = [image, *skips]
            decoder_features = self.decoder(*decoder_input) if self._decoder_varargs else self.decoder(decoder_input)
            mask_logits = self.segmentation_head(decoder_features)

        class_logits = None
        if self.classifier is not None:
            deepest, attn_map = _apply_attention(self.classifier_attention, features[-1])
            if attn_map is not None:
                attention["classifier"] = attn_map
            pooled = self.fusion(deepest, mask_logits, decoder_features)
            if self.meta_dim and meta is None:
                raise ValueError(f"this network reads clinical metadata (meta_dim={self.meta_dim}); pass meta")
            if self.meta is not None:
                pooled = torch.cat([pooled, self.meta(meta)], dim=1)
            class_logits = self.classifier(pooled)
            if self.late_fusion is not None and not self.training:
                class_logits = class_logits + self.late_fusion(meta)
        return SkinFusionOutput(mask_logits, class_logits, attention)

    # ------------------------------------------------------------------ training helpers

    def encoder_parameters(self) -> Iterator[nn.Parameter]:
        """The encoder's pretrained parameters (for a lower learning rate); in-block attention excluded."""
        for key, param in self.encoder.model.named_parameters():
            if not self.encoder.is_attention_key(key):
                yield param

    def head_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter not in :meth:`encoder_parameters`: decoder, heads, all attention modules."""
        encoder_ids = {id(p) for p in self.encoder_parameters()}
        for param in self.parameters():
            if id(param) not in encoder_ids:
                yield param

    def freeze_encoder(self, freeze: bool = True) -> None:
        """Freeze (no gradients, BatchNorm in eval mode) or unfreeze the encoder; in-block attention stays trainable."""
        if freeze:
            self.encoder.freeze()
        else:
            self.encoder.unfreeze()


def _apply_attention(module: nn.Module, x: Tensor) -> tuple[Tensor, Tensor | None]:
    """Run an attention module (or ``nn.Identity``) and return its map directly (no state kept)."""
    if isinstance(module, AttentionModule):
        return module.forward_with_map(x)
    return module(x), None
