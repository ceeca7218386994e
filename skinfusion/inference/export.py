"""Export a trained network to ONNX, TorchScript, safetensors or the Hugging Face layout (``skinfusion export``).

Every file carries the model's :class:`~skinfusion.io.InferenceSettings` as metadata (ONNX ``metadata_props``,
the TorchScript extra file ``skinfusion.json``, the safetensors header) and is written atomically.

* **ONNX** (opset >= 17, default 18): input ``image`` (B,C,S,S) (and ``meta`` (B,M) for a network with a
  metadata branch), batch axis dynamic; outputs ``mask_logits`` (B,1,S,S), ``class_logits`` (B,K) and one
  ``attn/<name>`` (B,1,h,w) per spatial attention map, in that order; disabled parts are left out. Uses the
  ``torch.export``-based exporter (needs ``onnxscript``), else the legacy TorchScript-based one.
* **TorchScript**: ``torch.jit.trace`` of a wrapper returning the same tuple; ``skinfusion.json`` also
  holds the ``output_names``.
* **safetensors**: the state dict (``format`` = ``skinfusion.net``), read back by :func:`load_safetensors_export`.
* **hf**: a ``save_pretrained`` folder (``config.json``, ``model.safetensors``, a ``README.md`` model card with
  the ``--metrics`` of ``skinfusion evaluate``).

``--quantize int8`` (with ``--format onnx``) writes a static int8 (QDQ) ONNX file calibrated on images of a
manifest, refused unless its ISIC metrics stay within ``--tolerance`` of the fp32 model's
(:mod:`skinfusion.inference.quantize`).

The Predictor and every ``--ckpt`` take a safetensors export, an hf folder or an ONNX file (fp32 or int8, run by
ONNX Runtime: :class:`~skinfusion.inference.onnxnet.OnnxNet`).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from skinfusion.errors import config_errors
from skinfusion.io import InferenceSettings, atomic_path
from skinfusion.nn import SkinFusionNet

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

FORMATS = ("onnx", "torchscript", "safetensors", "hf")
#: Lowest ONNX opset accepted; the default is 18 (the torch.export-based exporter's own).
MIN_OPSET = 17
DEFAULT_OPSET = 18


class ExportWrapper(nn.Module):
    """Wrap a network so that its output is a flat tuple of tensors (what exporters and tracers need).

    Args:
        net: a network returning :class:`~skinfusion.nn.output.SkinFusionOutput`.
        attention_names: attention maps to output, in order (from :func:`output_names`).
        has_mask, has_class: output ``mask_logits``, ``class_logits``.

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


def _settings(net: SkinFusionNet, settings: InferenceSettings | None) -> InferenceSettings:
    """The record to write: the given one, else the network's own with the default input settings."""
    return settings or InferenceSettings.defaults_for(net)


def _wrap(net: SkinFusionNet, image_size: int, batch_size: int) -> tuple[ExportWrapper, tuple[Tensor, ...], list[str]]:
    """The wrapper to export, a seeded example input (image[, meta]) and the output names."""
    net = net.eval()
    generator = torch.Generator().manual_seed(0)
    inputs: tuple[Tensor, ...] = (torch.randn(batch_size, net.in_chans, image_size, image_size, generator=generator),)
    if net.meta_dim:
        inputs += (torch.rand(batch_size, net.meta_dim, generator=generator),)
    device = next(net.parameters()).device  # a network on a GPU is traced with inputs on that GPU
    inputs = tuple(t.to(device) for t in inputs)
    with torch.no_grad():
        probe = net(*inputs)
    parts = {"mask_logits": probe.mask_logits, "class_logits": probe.class_logits}
    names = [name for name, value in parts.items() if value is not None]
    names += ["attn/" + re.sub(r"[^A-Za-z0-9_.\-]", "_", name) for name in probe.attention]
    wrapper = ExportWrapper(net, list(probe.attention), "mask_logits" in names, "class_logits" in names)
    return wrapper.eval(), inputs, names


def output_names(net: SkinFusionNet, image_size: int = 64) -> list[str]:
    """Names of the exported outputs: ``mask_logits``, ``class_logits``, ``attn/<map>``... (parts present only)."""
    return _wrap(net, image_size, 1)[2]


def export_onnx(
    net: SkinFusionNet,
    path: str | Path,
    settings: InferenceSettings | None = None,
    opset: int = DEFAULT_OPSET,
    batch_size: int = 2,
) -> list[str]:
    """Export ``net`` to one ONNX file with a dynamic batch axis.

    Args:
        net: the network (put in eval mode).
        path: output ``.onnx`` file (weights inside the file).
        settings: the record to store; its ``image_size`` is the input side S (height and width are fixed to it).
            Default: the network's config, 224 px, ``imagenet`` normalisation.
        batch_size: batch of the example input used for tracing (any batch runs afterwards).

    Returns:
        The output names, in order.

    Raises:
        ValueError: on an opset below 17 or a non-positive size.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET}, got {opset}")
    settings = _settings(net, settings)
    wrapper, inputs, names = _wrap(net, settings.image_size, batch_size)
    input_names = ["image", "meta"][: len(inputs)]
    common = {"input_names": input_names, "output_names": names, "opset_version": opset}
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
            shapes = {name: {0: batch} for name in input_names}
            program = torch.onnx.export(
                wrapper, inputs, dynamo=True, dynamic_shapes=shapes, external_data=False, verbose=False, **common
            )
            program.model.metadata_props.update(settings.to_metadata())
            program.save(str(tmp), external_data=False)
        else:
            axes = {name: {0: "batch"} for name in [*input_names, *names]}
            try:
                torch.onnx.export(wrapper, inputs, str(tmp), dynamo=False, dynamic_axes=axes, **common)
            except Exception as error:
                raise RuntimeError(
                    "the legacy ONNX exporter failed on this network (dynamic shapes such as mask_pool fusion "
                    "need the torch.export-based exporter): pip install onnxscript"
                ) from error
            import onnx

            model = onnx.load(str(tmp))
            onnx.helper.set_model_props(model, settings.to_metadata())
            onnx.save(model, str(tmp))
    return names


def export_torchscript(
    net: SkinFusionNet, path: str | Path, settings: InferenceSettings | None = None, batch_size: int = 2
) -> list[str]:
    """Trace ``net`` with :func:`torch.jit.trace` and save it (any batch size runs afterwards).

    The archive's extra file ``skinfusion.json`` holds the record and the ``output_names`` (read it with
    ``torch.jit.load(path, _extra_files={"skinfusion.json": ""})``); ``settings`` as in :func:`export_onnx`.

    Returns:
        The output names, in the order of the traced module's output tuple.
    """
    settings = _settings(net, settings)
    wrapper, inputs, names = _wrap(net, settings.image_size, batch_size)
    extra = {"skinfusion.json": json.dumps({**settings.to_dict(), "output_names": names})}
    with atomic_path(path) as tmp, warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit.trace is deprecated upstream but still the portable format
        torch.jit.save(torch.jit.trace(wrapper, inputs, check_trace=False), str(tmp), _extra_files=extra)
    return names


def export_safetensors(
    net: SkinFusionNet, path: str | Path, settings: InferenceSettings | None = None
) -> dict[str, str]:
    """Save the weights and the record (``settings`` as in :func:`export_onnx`) as safetensors; returns the metadata."""
    from skinfusion.io import save_safetensors

    metadata = {"format": "skinfusion.net", **_settings(net, settings).to_metadata()}
    save_safetensors(net.state_dict(), path, metadata=metadata)
    return metadata


def load_safetensors_export(path: str | Path, map_location: str = "cpu") -> tuple[SkinFusionNet, InferenceSettings]:
    """Rebuild the network saved by :func:`export_safetensors`: ``(net in eval mode, its record)``.

    Raises:
        WeightsError: the file is not a skinfusion export or its weights do not fit the config.
    """
    from safetensors import safe_open

    from skinfusion.errors import WeightsError
    from skinfusion.io import load_state_dict

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != "skinfusion.net" or "net_config" not in metadata:
        raise WeightsError(f"{path}: not a skinfusion safetensors export (no net_config metadata)")
    settings = InferenceSettings.from_metadata(metadata)
    net = SkinFusionNet(**settings.net_config)
    try:
        net.load_state_dict(load_state_dict(path, map_location))
    except RuntimeError as error:
        raise WeightsError(f"{path}: weights do not match the stored config ({error})") from error
    return net.eval(), settings


def build_parser() -> argparse.ArgumentParser:
    from skinfusion.inference.quantize import CALIBRATION_METHODS  # light: ONNX Runtime loads when quantizing

    parser = argparse.ArgumentParser(
        prog="skinfusion export",
        description="Export a skinfusion checkpoint to ONNX, TorchScript, safetensors or a Hugging Face folder.",
        epilog=(
            "ONNX/TorchScript outputs: mask_logits (B,1,S,S), class_logits (B,K), attn/<name> (B,1,h,w); "
            "the batch axis is dynamic. Example: skinfusion export --ckpt best.ckpt --format onnx --out model.onnx; "
            "skinfusion export --ckpt best.ckpt --format hf --out skinfusion-ham10000 --metrics report/metrics.json; "
            "skinfusion export --ckpt best.ckpt --format onnx --quantize int8 --calibration cache/manifest.csv "
            "--out model.int8.onnx"
        ),
    )
    parser.add_argument(
        "--ckpt",
        required=True,
        help="skinfusion checkpoint (.ckpt), safetensors export or hf folder (with --quantize: also an fp32 .onnx)",
    )
    parser.add_argument(
        "--format", required=True, choices=FORMATS, help="export format (hf: config.json, model.safetensors, README.md)"
    )
    parser.add_argument("--out", required=True, help="output file (a folder for --format hf)")
    parser.add_argument(
        "--metrics", default=None, help="hf: metrics.json of `skinfusion evaluate` to put on the model card"
    )
    parser.add_argument(
        "--image-size", type=int, default=None, help="input side S (default: the checkpoint's, else 224)"
    )
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset, >= {MIN_OPSET} (default: 18)")
    parser.add_argument("--batch-size", type=int, default=2, help="batch of the tracing example (default: 2)")
    parser.add_argument(
        "--no-verify", action="store_true", help="skip comparing the exported model with PyTorch on a batch of 3"
    )
    quant = parser.add_argument_group(
        "int8 quantization (--format onnx)",
        "Static int8 (QDQ) quantization with ONNX Runtime, calibrated on images of a manifest preprocessed as "
        "predict does; refused (exit status 2, no file written) when thresholded Jaccard, Dice or balanced "
        "accuracy on calibration-disjoint images differ from the fp32 model's by more than --tolerance. "
        "Writes OUT and OUT's <name>.quantization.json/.md report (sizes, nodes left in fp32, the guard).",
    )
    quant.add_argument("--quantize", choices=("int8",), default=None, help="quantize the ONNX file")
    quant.add_argument("--calibration", default=None, help="manifest CSV whose images calibrate and guard")
    quant.add_argument("--split", default="val", help="the manifest's split to use (default: val; all: every row)")
    quant.add_argument("--n", type=int, default=256, help="calibration images, a seeded draw (default: 256)")
    quant.add_argument(
        "--guard-split", default=None, help="split of the guard's images (default: --split's, less the calibration's)"
    )
    quant.add_argument(
        "--guard-n",
        type=int,
        default=None,
        help="at most this many guard images (default: all; balanced accuracy on few images of a rare class "
        "moves by a large step per changed image)",
    )
    quant.add_argument(
        "--tolerance", type=float, default=0.005, help="largest accepted metric difference int8 - fp32 (default: 0.005)"
    )
    quant.add_argument(
        "--calibrate-method",
        choices=CALIBRATION_METHODS,
        default="percentile",
        help="activation ranges: percentile (99.999th, the default: on a CPU-recipe checkpoint it changed fewer "
        "classes than minmax), minmax, entropy",
    )
    quant.add_argument(
        "--keep-fp32",
        choices=("none", "first", "last", "first+last"),
        default="first",
        help="layers left in fp32: those reading the inputs (first: the stem convolution; default), "
        "writing the outputs (last), both, none",
    )
    quant.add_argument("--seed", type=int, default=0, help="seed of the calibration draw (default: 0)")
    return parser


def verify_export(path: str | Path, net: SkinFusionNet, image_size: int, batch_size: int = 3) -> dict[str, float]:
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
    """``skinfusion export``: write the chosen format; returns the file (folder for ``--format hf``).

    Raises:
        SystemExit: when verification finds an output differing by more than 1e-3.
        QuantizationError: with ``--quantize int8``, when the int8 model fails the accuracy guard.
    """
    from dataclasses import replace

    from skinfusion.inference.predictor import load_model

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.metrics and args.format != "hf":
        parser.error("--metrics fills the model card of --format hf only")
    if args.quantize and args.format != "onnx":
        parser.error("--quantize int8 quantizes an ONNX file: add --format onnx")
    if args.quantize and not args.calibration:
        parser.error("--quantize int8 needs --calibration MANIFEST (images to calibrate and check it on)")
    if args.calibration and not args.quantize:
        parser.error("--calibration goes with --quantize int8")
    from_onnx = Path(args.ckpt).suffix == ".onnx"
    if from_onnx and not args.quantize:
        parser.error("--ckpt is an ONNX file: it can be quantized (--quantize int8); other exports need the checkpoint")
    net, settings = load_model(args.ckpt)
    if from_onnx and args.image_size and args.image_size != settings.image_size:
        parser.error(f"{args.ckpt} takes {settings.image_size} px inputs; --image-size cannot change an ONNX file")
    names: list[str] = []
    with config_errors():
        if args.image_size:
            settings = replace(settings, image_size=args.image_size)
        if args.quantize:
            return _export_int8(args, net, settings, from_onnx)
        if args.format == "onnx":
            names = export_onnx(net, args.out, settings, opset=args.opset, batch_size=args.batch_size)
        elif args.format == "torchscript":
            names = export_torchscript(net, args.out, settings, batch_size=args.batch_size)
        elif args.format == "safetensors":
            export_safetensors(net, args.out, settings)
        else:
            net.save_pretrained(args.out, settings=settings, metrics=args.metrics)
    image_size = settings.image_size
    print(f"wrote {args.out} ({args.format}, input {image_size}x{image_size})")
    if names:
        print("outputs: " + ", ".join(names))
    if names and not args.no_verify:
        _verify(args.out, net, image_size)
    return Path(args.out)


def _verify(path: str | Path, net: SkinFusionNet, image_size: int) -> None:
    diffs = verify_export(path, net, image_size)
    worst = max(diffs.values())
    print(f"max |exported - eager| over outputs on a batch of 3: {worst:.2e}")
    if worst > 1e-3:
        raise SystemExit(f"exported model differs from PyTorch: {diffs}")


def _export_int8(args: argparse.Namespace, net: nn.Module, settings: InferenceSettings, from_onnx: bool) -> Path:
    """``--quantize int8``: export fp32 (unless ``--ckpt`` is one), calibrate, guard, write the file and report."""
    import tempfile

    from skinfusion.inference.inputs import collect_records
    from skinfusion.inference.quantize import quantize_onnx, report_path, select_images

    records = collect_records(args.calibration)
    calibration, guard, guard_source = select_images(
        records,
        settings.class_names,
        args.split,
        n=args.n,
        guard_n=args.guard_n,
        seed=args.seed,
        guard_split=args.guard_split,
    )
    where = "every image" if args.split in (None, "all") else f"split {args.split!r}"
    calibration_source = f"{args.calibration}, {where}, seed {args.seed}"
    with tempfile.TemporaryDirectory() as folder:
        if from_onnx:
            fp32, fp32_name = Path(args.ckpt), str(args.ckpt)
        else:
            fp32 = Path(folder) / "fp32.onnx"
            export_onnx(net, fp32, settings, opset=args.opset, batch_size=args.batch_size)
            fp32_name = f"{args.ckpt} (exported to fp32 ONNX, opset {args.opset})"
            if not args.no_verify:
                _verify(fp32, net, settings.image_size)
        print(f"calibrating on {len(calibration)} images of {calibration_source}; guard: {len(guard)} images")
        report = quantize_onnx(
            fp32,
            args.out,
            calibration,
            guard,
            tolerance=args.tolerance,
            calibration_source=calibration_source,
            guard_source=guard_source,
            fp32_name=fp32_name,
            method=args.calibrate_method,
            keep_fp32=args.keep_fp32,
        )
    sizes, result = report["size_bytes"], report["guard"]
    print(
        f"wrote {args.out} (int8 QDQ, input {settings.image_size}x{settings.image_size}): "
        f"{sizes['int8'] / 2**20:.2f} MB, {sizes['int8'] / sizes['fp32']:.0%} of fp32's {sizes['fp32'] / 2**20:.2f} MB"
    )
    print(f"accuracy guard on {result['images']} images ({guard_source}), tolerance {result['tolerance']}:")
    for name, metric in result["metrics"].items():
        print(f"  {name}: fp32 {metric['fp32']:.4f}, int8 {metric['int8']:.4f} ({metric['difference']:+.4f})")
    fp32_nodes = report["runtime"]["fp32_ops"]
    print("left in fp32 by ONNX Runtime: " + (", ".join(f"{op} x{n}" for op, n in fp32_nodes.items()) or "nothing"))
    print(f"report: {report_path(args.out, '.md')}")
    return Path(args.out)
