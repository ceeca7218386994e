"""A timm feature encoder, optionally with attention inside its residual blocks, and its weight loading.

Loading is strict except for the attention parameters this encoder adds (and the classifier keys a
features-only model has no use for); what was not loaded is returned in a :class:`LoadReport` and logged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import timm
from torch import Tensor, nn

from skinfusion.errors import WeightsError
from skinfusion.io import load_state_dict
from skinfusion.nn.attention import AttentionModule, check_attention_kwargs, get_attention

__all__ = ["LoadReport", "TimmEncoder"]

log = logging.getLogger(__name__)

# Prefixes under which an earlier skinfusion checkpoint holds the encoder's timm model, most specific first:
# SkinFusionModule.net -> SkinFusionNet.encoder -> TimmEncoder.model.
_SKINFUSION_PREFIXES = ("model.net.encoder.model.", "net.encoder.model.", "encoder.model.")
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile


@dataclass
class LoadReport:
    """What :meth:`TimmEncoder.load_pretrained` did.

    Encoder keys ``loaded`` from ``source``, ``new`` ones left at their initialisation (attention parameters, old
    files' ``num_batches_tracked``), and ``ignored`` source keys (a classifier, a checkpoint's decoder and heads).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    new: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        new = ", ".join(self.new) if self.new else "none"
        return (
            f"loaded {len(self.loaded)} encoder tensors from {self.source}; "
            f"{len(self.ignored)} source keys ignored; newly initialised: {new}"
        )


class TimmEncoder(nn.Module):
    """Multi-scale features of any timm model (``features_only=True``).

    Args:
        name: timm model name, e.g. ``"resnet50"``, ``"test_resnet"``, ``"efficientnet_b0"``.
        pretrained: ``False``; ``True`` for the timm hub's weights; or a path to a local weight file
            (timm classifier state dict as ``.safetensors``/``.pth``/``.bin``, or a skinfusion ``.ckpt``).
        out_indices: feature levels to return; ``None`` for all of them (5 for a ResNet: strides 2..32).
        attention: registry name of an attention module to put inside every residual block (after the last
            convolution, before the residual sum, as in CBAM); ``None``/``"none"`` for none. Needs a timm model
            that takes ``block_args`` (the ResNet family).
        attention_kwargs: arguments of the attention module.

    Raises:
        ValueError: the model cannot take attention inside its blocks, or bad attention arguments.
        WeightsError: pretrained weights cannot be fetched or do not fit.
    """

    def __init__(
        self,
        name: str = "resnet50",
        pretrained: bool | str | Path = False,
        in_chans: int = 3,
        out_indices: tuple[int, ...] | list[int] | None = None,
        attention: str | None = None,
        attention_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        self.in_chans = in_chans
        kwargs: dict[str, Any] = {"features_only": True, "pretrained": False, "in_chans": in_chans}
        if out_indices is not None:
            kwargs["out_indices"] = tuple(out_indices)
        attn_cls = get_attention(attention)
        if attn_cls is not None:
            check_attention_kwargs(attention, attention_kwargs)
            kwargs["block_args"] = {"attn_layer": partial(attn_cls, **(attention_kwargs or {}))}
            # timm zero-initialises the last norm of each residual branch, which would feed the attention
            # all zeros (and give it no gradient) until that norm has grown; keep it trainable from step one.
            kwargs["zero_init_last"] = False
        try:
            self.model = timm.create_model(name, **kwargs)
        except TypeError as err:
            if "block_args" in kwargs and ("block_args" in str(err) or "zero_init_last" in str(err)):
                raise ValueError(
                    f"encoder {name!r} cannot take attention inside its blocks (it has no timm `block_args`; "
                    "the ResNet family has); use attention_placement 'skip' or 'classifier' instead"
                ) from err
            raise
        # Top-level attention modules only (CBAM's channel/spatial parts are inside CBAM's own map).
        self.attention_modules: dict[str, AttentionModule] = {}
        for path, module in self.model.named_modules():
            if isinstance(module, AttentionModule) and not any(
                path.startswith(p + ".") for p in self.attention_modules
            ):
                self.attention_modules[path] = module
        if attn_cls is not None and not self.attention_modules:
            raise ValueError(f"encoder {name!r} took `block_args` but built no {attention!r} attention module")
        # A block's map is named after the block: "layer3.2.se" -> "layer3.2".
        self._map_names = {path: path.rsplit(".", 1)[0] for path in self.attention_modules}
        self.frozen = False
        self.load_report: LoadReport | None = None
        if pretrained:
            self.load_report = self.load_pretrained(pretrained)

    @property
    def out_channels(self) -> list[int]:
        """Channels of each returned feature level."""
        return list(self.model.feature_info.channels())

    @property
    def reductions(self) -> list[int]:
        """Stride of each returned feature level with respect to the input."""
        return list(self.model.feature_info.reduction())

    @property
    def depth(self) -> int:
        """Number of returned feature levels."""
        return len(self.out_channels)

    def forward(self, image: Tensor) -> list[Tensor]:
        """Image (B,in_chans,H,W) -> a list of (B, out_channels[i], H/reductions[i], W/reductions[i])."""
        return list(self.model(image))

    def pop_attention_maps(self) -> dict[str, Tensor]:
        """Spatial maps of the in-block attention modules from the last forward, by block name; clears them."""
        maps = {self._map_names[path]: module.pop_map() for path, module in self.attention_modules.items()}
        return {name: attn_map for name, attn_map in maps.items() if attn_map is not None}

    def is_attention_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to an in-block attention module added by this encoder."""
        return any(key.startswith(path + ".") for path in self.attention_modules)

    # ------------------------------------------------------------------ weights

    def load_pretrained(self, pretrained: bool | str | Path) -> LoadReport:
        """Load pretrained weights (``True``: the timm hub's; else a file, as in the class docstring).

        Returns:
            A :class:`LoadReport` (also logged at INFO level).

        Raises:
            WeightsError: the weights cannot be fetched or read, or a key other than the new attention
                parameters is missing, unexpected, or of another shape.
        """
        if pretrained is not True:
            state_dict, source = load_state_dict(pretrained), str(pretrained)
        else:
            try:
                state_dict = timm.create_model(self.name, pretrained=True, in_chans=self.in_chans).state_dict()
            except Exception as err:  # no network, no hub id, offline mode, ...
                raise WeightsError(
                    f"could not fetch pretrained weights for {self.name!r} from the timm hub "
                    f"({type(err).__name__}: {err}). Download them where there is network and pass the file: "
                    "pretrained='path/to/model.safetensors'"
                ) from err
            source = f"timm hub ({self.name})"
        report = self.load_encoder_state_dict(state_dict, source=source)
        log.info("%s", report)
        return report

    def load_encoder_state_dict(self, state_dict: dict[str, Tensor], source: str = "state dict") -> LoadReport:
        """Load a timm classifier state dict or a skinfusion state dict into the encoder.

        Keys are matched exactly, after removing DDP/compile prefixes and, for a skinfusion checkpoint, the
        ``[model.]net.encoder.model.`` prefix; failing that, with ``_`` and ``.`` treated alike (timm's
        features wrappers flatten ``layer1.0`` into ``layer1_0``). A first convolution with other input
        channels is adapted as timm does (``adapt_input_conv``).

        Raises:
            WeightsError: as :meth:`load_pretrained`.
        """
        target = self.model.state_dict()
        source_sd, ignored = _strip_prefixes(state_dict)
        by_norm = {_normalise(k): k for k in target}
        mapped: dict[str, Tensor] = {}
        unexpected: list[str] = []
        head = (getattr(self.model, "pretrained_cfg", None) or {}).get("classifier", "fc")
        classifier = [head] if isinstance(head, str) else list(head)
        classifier += ["fc", "head", "classifier", "global_pool"]
        for key, value in source_sd.items():
            tkey = key if key in target else by_norm.get(_normalise(key))
            if tkey is None:
                if any(key == p or key.startswith(p + ".") for p in classifier):
                    ignored.append(key)
                else:
                    unexpected.append(key)
                continue
            mapped[tkey] = value
        mismatched = []
        for tkey, value in list(mapped.items()):
            expected = target[tkey].shape
            if value.shape == expected:
                continue
            if value.ndim == 4 and value.shape[1] != expected[1] and value.shape[0] == expected[0]:
                mapped[tkey] = timm.models.adapt_input_conv(expected[1], value)
                log.info("adapted %s from %d to %d input channels", tkey, value.shape[1], expected[1])
                continue
            mismatched.append(f"{tkey}: file {tuple(value.shape)} vs encoder {tuple(expected)}")
        missing = [k for k in target if k not in mapped]
        new = [k for k in missing if self.is_attention_key(k) or k.endswith("num_batches_tracked")]
        missing = [k for k in missing if k not in new]
        problems = [
            f"{len(keys)} {what}: {_head(keys)}"
            for keys, what in (
                (missing, "encoder keys missing from the file"),
                (unexpected, "keys the encoder does not have"),
                (mismatched, "shape mismatches"),
            )
            if keys
        ]
        if problems:
            raise WeightsError(
                f"{source}: does not fit encoder {self.name!r} (a different architecture?): " + "; ".join(problems)
            )
        self.model.load_state_dict(mapped, strict=False)
        return LoadReport(source=source, loaded=sorted(mapped), new=new, ignored=ignored)

    # ------------------------------------------------------------------ freezing

    def freeze(self, attention: bool = False) -> None:
        """Stop training the encoder: no gradients, BatchNorm statistics fixed (eval mode).

        Args:
            attention: also freeze the in-block attention modules (by default they stay trainable, as they
                are new and not pretrained).
        """
        for key, param in self.model.named_parameters():
            if attention or not self.is_attention_key(key):
                param.requires_grad = False
        self.frozen = True
        self.train(self.training)

    def unfreeze(self) -> None:
        """Train the whole encoder again."""
        for param in self.model.parameters():
            param.requires_grad = True
        self.frozen = False
        self.train(self.training)

    def train(self, mode: bool = True) -> TimmEncoder:
        super().train(mode)
        if self.frozen:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self


def _strip_prefixes(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Remove wrapper prefixes; keep only the encoder of a skinfusion state dict (others are ignored)."""
    out = {}
    for key, value in state_dict.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
        out[key] = value
    for prefix in _SKINFUSION_PREFIXES:
        if any(k.startswith(prefix) for k in out):
            encoder = {k[len(prefix) :]: v for k, v in out.items() if k.startswith(prefix)}
            return encoder, sorted(k for k in out if not k.startswith(prefix))
    return out, []


def _normalise(key: str) -> str:
    return key.replace("_", ".")


def _head(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")
