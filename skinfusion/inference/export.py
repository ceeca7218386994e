"""Export a trained network to ONNX, TorchScript or safetensors (``skinfusion export``).

* **ONNX** (opset >= 17, default 18): input ``image`` (B,3,S,S) (and ``meta`` (B,M) for a network
  with a metadata branch), batch axis dynamic; outputs ``mask_logits`` (B,1,S,S), ``class_logits``
  (B,K) and one ``attn/<name>`` (B,1,h,w) per spatial attention map (``attn/skip.4``,
  ``attn/classifier``...), in that order; disabled parts are left out. Uses PyTorch's
  ``torch.export``-based exporter (needs ``onnxscript``); without it, the legacy TorchScript-based
  exporter is tried.
* **TorchScript**: ``torch.jit.trace`` of a wrapper returning the same tuple; the output names
  and network config are stored in the archive's extra file ``skinfusion.json``.
* **safetensors**: the network's state dict with metadata ``net_config`` (JSON of the
  :class:`~skinfusion.nn.SkinFusionNet` arguments), ``class_names``, ``image_size``,
  ``normalization`` and ``format`` = ``skinfusion.net``; :func:`load_safetensors_export` rebuilds the
  network from it, and :class:`~skinfusion.inference.predictor.Predictor` accepts such a file as its model.

Every file is written to a temporary name beside the target and renamed over it when complete.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from skinfusion.io import atomic_path

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "ExportWrapper",
    "export_main",
    "export_onnx",
    "export_safetensors",
    "export_torchscript",
    "load_safetensors_export",
    "output_names",
]

FORMATS = ("onnx", "torchscript", "safetensors")
#: Lowest ONNX opset accepted; the default is 18 (the torch.export-based exporter's own).
MIN_OPSET = 17
DEFAULT_OPSET = 18


def _sanitize(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


class ExportWrapper(nn.Module):
    """Wrap a network so that its output is a flat tuple of tensors (what exporters and tracers need).

    Args:
        net: a network returning :class:`~skinfusion.nn.output.SkinFusionOutput`.
        attention_names: attention maps to output, in order (from :func:`output_names`).
        has_mask: output ``mask_logits``.
        has_class: output ``class_logits``.

    Shape:
        forward: image (B,3,S,S)[, meta (B,M)] -> (mask_logits (B,1,S,S), class_logits (B,K), *maps (B,1,h,w)).
    """

    def __init__(self, net: nn.Module, attention_names: Sequence[str], has_mask: bool, has_class: bool) -> None:
        super().__init__()
        self.net = net
        self.attention_names = list(attention_names)
        self.has_mask = has_mask
        self.has_class = has_class

    def forward(self, image: Tensor, meta: Tensor | None = None) -> tuple[Tensor, ...]:
        output = self.net(image, meta)
        outputs: list[Tensor] = []
        if self.has_mask:
            outputs.append(output.mask_logits)
        if self.has_class:
            outputs.append(output.class_logits)
        outputs.extend(output.attention[name] for name in self.attention_names)
        return tuple(outputs)


def _example_inputs(net: nn.Module, image_size: int, batch_size: int) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(0)
    image = torch.randn(batch_size, getattr(net, "in_chans", 3), image_size, image_size, generator=generator)
    meta_dim = int(getattr(net, "meta_dim", 0) or 0)
    if meta_dim:
        return image, torch.rand(batch_size, meta_dim, generator=generator)
    return (image,)


def _wrap(net: nn.Module, image_size: int, batch_size: int) -> tuple[ExportWrapper, tuple[Tensor, ...], list[str]]:
    net = net.eval()
    inputs = _example_inputs(net, image_size, batch_size)
    with torch.no_grad():
        probe = net(*inputs)
    attention_names = list(probe.attention)
    names = []
    if probe.mask_logits is not None:
        names.append("mask_logits")
    if probe.class_logits is not None:
        names.append("class_logits")
    names.extend(f"attn/{_sanitize(name)}" for name in attention_names)
    wrapper = ExportWrapper(net, attention_names, probe.mask_logits is not None, probe.class_logits is not None)
    return wrapper.eval(), inputs, names


def output_names(net: nn.Module, image_size: int = 64) -> list[str]:
    """Names of the exported outputs: ``mask_logits``, ``class_logits``, ``attn/<map>``... (parts present only)."""
    return _wrap(net, image_size, 1)[2]


def export_onnx(
    net: nn.Module, path: str | Path, image_size: int = 224, opset: int = DEFAULT_OPSET, batch_size: int = 2
) -> list[str]:
    """Export ``net`` to one ONNX file with a dynamic batch axis.

    Args:
        net: the network (put in eval mode).
        path: output ``.onnx`` file (written atomically, weights inside the file).
        image_size: input side S; height and width are fixed to it.
        opset: ONNX opset version, at least 17.
        batch_size: batch of the example input used for tracing (any batch runs afterwards).

    Returns:
        The output names, in order.

    Raises:
        ValueError: on an opset below 17 or a non-positive size.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
    wrapper, inputs, names = _wrap(net, image_size, batch_size)
    input_names = ["image", "meta"][: len(inputs)]
    try:
        import onnxscript  # noqa: F401  (the torch.export-based exporter needs it)

        dynamo = True
    except ImportError:
        log.warning("onnxscript is not installed: using the legacy TorchScript-based ONNX exporter")
        dynamo = False

    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=4096)
            dynamic_shapes = {name: {0: batch} for name in input_names}
            program = torch.onnx.export(
                wrapper,
                inputs,
                dynamo=True,
                input_names=input_names,
                output_names=names,
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                external_data=False,
                verbose=False,
            )
            program.save(str(tmp), external_data=False)
        else:
            axes = {name: {0: "batch"} for name in [*input_names, *names]}
            try:
                torch.onnx.export(
                    wrapper,
                    inputs,
                    tmp,
                    dynamo=False,
                    input_names=input_names,
                    output_names=names,
                    opset_version=opset,
                    dynamic_axes=axes,
                )
            except Exception as error:
                raise RuntimeError(
                    "the legacy ONNX exporter failed on this network (dynamic shapes such as mask_pool fusion "
                    "need the torch.export-based exporter): pip install onnxscript"
                ) from error
    return names


def export_torchscript(net: nn.Module, path: str | Path, image_size: int = 224, batch_size: int = 2) -> list[str]:
    """Trace ``net`` with :func:`torch.jit.trace` and save it (any batch size runs afterwards).

    The archive holds an extra file ``skinfusion.json`` with ``output_names``, ``image_size`` and
    the network's ``config`` (read it with ``torch.jit.load(path, _extra_files={"skinfusion.json": ""})``).

    Returns:
        The output names, in the order of the traced module's output tuple.
    """
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be positive, got {image_size}, {batch_size}")
    wrapper, inputs, names = _wrap(net, image_size, batch_size)
    extra = {
        "skinfusion.json": json.dumps(
            {"output_names": names, "image_size": image_size, "config": dict(getattr(net, "config", {}) or {})}
        )
    }

    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated upstream but still the portable format
        torch.jit.save(torch.jit.trace(wrapper, inputs, check_trace=False), str(tmp), _extra_files=extra)
    return names


def _net_config(module: nn.Module) -> dict[str, Any]:
    hparams = getattr(module, "hparams", None) or {}
    net = getattr(module, "net", module)
    config = dict(hparams.get("net_config") or getattr(net, "config", None) or {})
    config.pop("pretrained", None)
    return config


def export_safetensors(
    module: nn.Module,
    path: str | Path,
    image_size: int | None = None,
    normalization: str | None = None,
) -> dict[str, str]:
    """Save the network's weights as safetensors with its config in the metadata.

    Args:
        module: a :class:`~skinfusion.training.module.SkinFusionModule` (its ``net`` is saved) or a network
            with a ``config`` attribute.
        path: output ``.safetensors`` file (written atomically).
        image_size: input side to record (optional).
        normalization: input normalisation to record (optional).

    Returns:
        The metadata written (all values are strings; JSON where structured).

    Raises:
        ValueError: when no network config is known (the file could not be loaded back).
    """
    from skinfusion.io import save_safetensors

    net = getattr(module, "net", module)
    config = _net_config(module)
    if not config:
        raise ValueError("the network has no config (net.config / hparams['net_config']); cannot describe it")
    class_names = list(getattr(module, "class_names", None) or [])
    metadata = {
        "format": "skinfusion.net",
        "net_config": json.dumps(config),
        "class_names": json.dumps(class_names),
    }
    if image_size is not None:
        metadata["image_size"] = json.dumps(int(image_size))
    if normalization is not None:
        metadata["normalization"] = json.dumps(normalization)
    save_safetensors(net.state_dict(), path, metadata=metadata)
    return metadata


def load_safetensors_export(path: str | Path, map_location: str = "cpu") -> tuple[nn.Module, list[str], dict[str, Any]]:
    """Rebuild the network saved by :func:`export_safetensors`.

    Returns:
        ``(net in eval mode, class names, {"image_size": ..., "normalization": ...} as recorded)``.

    Raises:
        WeightsError: the file is not a skinfusion export or its weights do not fit the config.
    """
    from safetensors import safe_open

    from skinfusion.errors import WeightsError
    from skinfusion.io import load_state_dict
    from skinfusion.nn import SkinFusionNet

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != "skinfusion.net" or "net_config" not in metadata:
        raise WeightsError(f"{path}: not a skinfusion safetensors export (no net_config metadata)")
    config = {**json.loads(metadata["net_config"]), "pretrained": False}
    net = SkinFusionNet(**config)
    try:
        net.load_state_dict(load_state_dict(path, map_location))
    except RuntimeError as error:
        raise WeightsError(f"{path}: weights do not match the stored config ({error})") from error
    settings = {k: json.loads(metadata[k]) for k in ("image_size", "normalization") if k in metadata}
    return net.eval(), json.loads(metadata.get("class_names", "[]")), settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinfusion export",
        description="Export a trained skinfusion checkpoint to ONNX, TorchScript or safetensors.",
        epilog=(
            "ONNX/TorchScript outputs: mask_logits (B,1,S,S), class_logits (B,K), attn/<name> (B,1,h,w); "
            "the batch axis is dynamic. Example: skinfusion export --ckpt best.ckpt --format onnx --out model.onnx"
        ),
    )
    parser.add_argument("--ckpt", required=True, help="skinfusion checkpoint (.ckpt)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument("--out", required=True, help="output file")
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side S (default: the checkpoint's, else 224)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default: 18)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the tracing example (default: 2)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip comparing the exported model with PyTorch on a batch of 3"
    )
    return parser


def verify_export(path: str | Path, net: nn.Module, image_size: int, batch_size: int = 3) -> dict[str, float]:
    """Largest absolute difference per output between an exported file and the eager network.

    Runs ONNX files with onnxruntime and TorchScript files with ``torch.jit.load``, on a batch
    size different from the export's default, so the dynamic batch axis is exercised.
    """
    path = Path(path)
    wrapper, inputs, names = _wrap(net, image_size, batch_size)
    with torch.no_grad():
        expected = wrapper(*inputs)
    if path.suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs, strict=True)}
        got = [torch.from_numpy(a) for a in session.run(names, feed)]
    else:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream
            got = torch.jit.load(str(path), map_location="cpu")(*inputs)
    return {n: float((g - e).abs().max()) for n, g, e in zip(names, got, expected, strict=True)}


def export_main(argv: Sequence[str] | None = None) -> Path:
    """``skinfusion export``: load a checkpoint safely and write the chosen format.

    Returns:
        The written file.

    Raises:
        SystemExit: when verification finds an output differing by more than 1e-3.
    """
    from skinfusion.inference.predictor import DEFAULT_IMAGE_SIZE, checkpoint_settings
    from skinfusion.io import load_checkpoint
    from skinfusion.training.module import SkinFusionModule

    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.ckpt)  # read once: settings and weights
    settings = checkpoint_settings(ckpt)
    image_size = int(args.image_size or settings.get("image_size") or DEFAULT_IMAGE_SIZE)
    module = SkinFusionModule.from_checkpoint(ckpt).eval()
    net = module.net.eval()
    if args.format == "onnx":
        names = export_onnx(net, args.out, image_size=image_size, opset=args.opset, batch_size=args.batch_size)
    elif args.format == "torchscript":
        names = export_torchscript(net, args.out, image_size=image_size, batch_size=args.batch_size)
    else:
        export_safetensors(module, args.out, image_size=image_size, normalization=settings.get("normalization"))
        names = []
    print(f"wrote {args.out} ({args.format}, input {image_size}x{image_size})")
    if names:
        print("outputs: " + ", ".join(names))
    if names and not args.no_verify:
        diffs = verify_export(args.out, net, image_size)
        worst = max(diffs.values())
        print(f"max |exported - eager| over outputs on a batch of 3: {worst:.2e}")
        if worst > 1e-3:
            raise SystemExit(f"exported model differs from PyTorch: {diffs}")
    return Path(args.out)


if __name__ == "__main__":
    export_main()
