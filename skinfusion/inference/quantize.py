"""Static int8 quantization of an ONNX export, with an accuracy guard (``skinfusion export --quantize int8``).

ONNX Runtime's static quantization (:func:`onnxruntime.quantization.quantize_static`) in the QDQ format:
weights int8 per output channel, activations uint8 with ranges calibrated (min/max by default) on images of the
user's manifest, read, resized and normalised exactly as the :class:`~skinfusion.inference.predictor.Predictor`
reads them (its :class:`~skinfusion.inference.predictor.ImageDataset`). ``quant_pre_process`` (ONNX shape
inference and ONNX Runtime's basic graph optimisations) runs first: on the CPU recipe's network the int8 file
runs 1.7x faster with it. Weights use 7 bits by default (``reduce_range``): the AVX2 kernels of CPUs without VNNI
multiply uint8 by int8 in int16 pairs, which 8-bit weights can saturate.

The accuracy guard then scores the int8 and the fp32 model on images with ground truth that the calibration did
not see (the rest of the calibration split; the whole split when fewer than :data:`MIN_GUARD_IMAGES` remain), as
``skinfusion evaluate`` scores them (original resolution, default post-processing, the ISIC metrics of
:mod:`skinfusion.evaluation`): thresholded Jaccard, Dice, balanced accuracy. A metric that differs by more than
the tolerance refuses the file (:class:`QuantizationError`); it is written atomically only once accepted, with its
inference record and how it was quantized (metadata key :data:`~skinfusion.inference.onnxnet.QUANTIZATION_KEY`),
and a report beside it (``<name>.quantization.json`` and ``.md``): sizes, the nodes that run in fp32, the guard.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skinfusion.data.records import Record
from skinfusion.errors import DataError, SkinFusionError
from skinfusion.inference.onnxnet import QUANTIZATION_KEY, OnnxNet
from skinfusion.io import InferenceSettings, atomic_path, atomic_write

log = logging.getLogger(__name__)

__all__ = [
    "CALIBRATION_METHODS",
    "GUARD_METRICS",
    "KEEP_FP32",
    "MIN_GUARD_IMAGES",
    "CalibrationReader",
    "QuantizationError",
    "accuracy_guard",
    "quantize_int8",
    "quantize_onnx",
    "report_path",
    "runtime_precision",
    "select_images",
]

#: Calibration methods of ``onnxruntime.quantization.CalibrationMethod`` by name.
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: Layers left in fp32 by name: ``first`` the nodes reading the network's inputs (the stem convolution, the
#: metadata branch's first layer), ``last`` those writing its outputs (heads, attention maps).
KEEP_FP32 = ("none", "first", "last", "first+last")
#: The metrics the guard compares: name -> (key in :func:`~skinfusion.evaluation.report.score_predictions`, label).
GUARD_METRICS = {
    "threshold_jaccard": ("task1/threshold_jaccard", "thresholded Jaccard"),
    "dice": ("task1/dice", "Dice"),
    "balanced_accuracy": ("task3/balanced_accuracy", "balanced accuracy"),
}
#: Fewer calibration-disjoint images than this and the guard scores the whole calibration split instead.
MIN_GUARD_IMAGES = 20
#: Ops of the runtime graph that run in integer arithmetic (ONNX Runtime's fused QDQ kernels).
_INT8_PREFIXES = ("QLinear", "QGemm", "MatMulInteger", "ConvInteger", "DynamicQuantize")
_BOUNDARY_OPS = ("QuantizeLinear", "DequantizeLinear")


class QuantizationError(SkinFusionError):
    """The int8 model is refused: it differs from the fp32 model by more than the tolerance, or cannot be made."""

    hint = (
        "score the guard on more images (--guard-n, --guard-split: a class with few guard images moves balanced "
        "accuracy by a large step per changed image), calibrate on more or more representative images "
        "(--calibration, --split, --n), try another --calibrate-method or --keep-fp32, or accept a larger "
        "difference (--tolerance)"
    )


class CalibrationReader:
    """An ``onnxruntime.quantization.CalibrationDataReader``: batches of ``records`` as the Predictor feeds them.

    Args:
        records: the calibration images.
        settings: the model's record (input side, normalisation).
        meta: feed the encoded metadata (``meta`` input) too.
        batch_size: images per calibration batch.

    Raises:
        DataError: (from :meth:`get_next`) an image cannot be read.
    """

    def __init__(self, records: Sequence[Record], settings: InferenceSettings, meta: bool, batch_size: int = 8):
        from skinfusion.inference.predictor import ImageDataset

        if not records:
            raise DataError(None, "no calibration images")
        self.dataset = ImageDataset(records, settings.image_size, settings.normalization, meta=meta)
        self.batch_size = batch_size
        self.meta = meta
        self.num_images = len(self.dataset)
        self.rewind()

    def rewind(self) -> None:
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=list)
        self._batches = iter(loader)

    def get_next(self) -> dict[str, np.ndarray] | None:
        items = next(self._batches, None)
        if items is None:
            return None
        for item in items:
            if "error" in item:
                raise item["error"]
        feed = {"image": torch.stack([item["image"] for item in items]).numpy()}
        if self.meta:
            feed["meta"] = torch.stack([item["meta"] for item in items]).numpy()
        return feed


def _has_truth(record: Record, class_names: Sequence[str]) -> bool:
    return record.mask is not None or record.label in class_names


def _split(records: Sequence[Record], split: str | None, option: str) -> tuple[list[Record], str]:
    """The records of ``split`` (all for ``None``/``"all"``) and how to name them."""
    if split in (None, "all"):
        return list(records), "every image"
    if not any("split" in r.meta for r in records):
        raise DataError(None, f"the manifest has no split column: choose {option} all, not {split!r}")
    chosen = [r for r in records if r.meta.get("split") == split]
    if not chosen:
        raise DataError(None, f"no image in split {split!r} ({option})")
    return chosen, f"split {split!r}"


def select_images(
    records: Sequence[Record],
    class_names: Sequence[str],
    split: str | None = "val",
    n: int = 256,
    guard_n: int | None = None,
    seed: int = 0,
    guard_split: str | None = None,
) -> tuple[list[Record], list[Record], str]:
    """Draw the calibration images and the accuracy guard's images from a manifest's records.

    Args:
        records: the manifest's records (``meta["split"]`` holds each one's split).
        class_names: the model's classes (a label outside them is no ground truth for the guard).
        split: the split to calibrate on (``None`` or ``"all"``: every record).
        n: calibration images (a seeded random draw; all when the split has fewer).
        guard_n: at most this many guard images (images with a mask or a known label, in a seeded order); default
            all. Balanced accuracy weighs every class equally, so on few images of a rare class one changed image
            moves it by a large step: on 256 validation images with 4 AKIEC ones, one changed AKIEC image was
            0.036, on the split's 881 images with 2 DF ones a changed DF image would be 0.071.
        seed: the draw's seed.
        guard_split: the split the guard's images come from; default ``split``: its images the calibration did
            not draw, or all of them (calibration images included) when fewer than :data:`MIN_GUARD_IMAGES` remain.

    Returns:
        ``(calibration, guard, source)``; ``source`` says where the guard's images come from.

    Raises:
        DataError: a split is empty, or the manifest has no split column, or no image has ground truth for the guard.
    """
    if n < 1 or (guard_n is not None and guard_n < 1):
        raise ValueError(f"n and guard_n must be positive, got {n} and {guard_n}")
    pool, where = _split(records, split, "--split")
    calibration = [pool[i] for i in np.random.default_rng(seed).permutation(len(pool))][:n]
    chosen = {r.id for r in calibration}
    same = guard_split is None or guard_split == split
    if not same:
        pool, where = _split(records, guard_split, "--guard-split")
    shuffled = [pool[i] for i in np.random.default_rng(seed + 1).permutation(len(pool))]
    truth = [r for r in shuffled if _has_truth(r, class_names)]
    disjoint = [r for r in truth if r.id not in chosen]
    if not truth:
        raise DataError(None, f"no image of {where} has a mask or a label of {list(class_names)}: nothing to guard")
    if len(disjoint) >= MIN_GUARD_IMAGES or (not same and disjoint):
        return calibration, disjoint[:guard_n], f"{where}, disjoint from the calibration images"
    return (
        calibration,
        truth[:guard_n],
        f"{where}, overlapping the calibration images (only {len(disjoint)} disjoint ones; at least "
        f"{MIN_GUARD_IMAGES} are needed)",
    )


def runtime_precision(path: str | Path) -> dict[str, Any]:
    """What ONNX Runtime's CPU provider runs in int8 and in fp32 once it has fused the QDQ pattern.

    The file is optimised (portable ``ORT_ENABLE_EXTENDED`` level) and each node's data type followed from the
    inputs: ``DequantizeLinear`` produces floats, ``QuantizeLinear`` and the fused integer kernels (``QLinearConv``,
    ``QGemm``...) 8-bit integers, any other node the type of its first input (``MaxPool`` or ``Resize`` of uint8
    data count as int8 ops; shape arithmetic as neither).

    Returns:
        ``{"int8_ops": {op: count}, "fp32_nodes": [{"name", "op_type"}...], "fp32_ops": {op: count},
        "quantize_linear": n, "dequantize_linear": n}``.
    """
    import onnx
    import onnxruntime

    with tempfile.TemporaryDirectory() as folder:
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        options.optimized_model_filepath = str(Path(folder) / "optimized.onnx")
        onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        model = onnx.load(options.optimized_model_filepath)
    float_types = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    floats = {i.name for i in model.graph.input if i.type.tensor_type.elem_type in float_types}
    floats |= {t.name for t in model.graph.initializer if t.data_type in float_types}
    quantized: set[str] = set()
    int8_ops: Counter[str] = Counter()
    fp32_nodes: list[dict[str, str]] = []
    boundary: Counter[str] = Counter()
    for node in model.graph.node:  # a saved graph is topologically sorted
        first = node.input[0] if node.input else ""
        if node.op_type in _BOUNDARY_OPS:
            boundary[node.op_type] += 1
            (floats if node.op_type == "DequantizeLinear" else quantized).update(node.output)
        elif node.op_type.startswith(_INT8_PREFIXES) or first in quantized:  # QLinearConv; MaxPool on uint8...
            int8_ops[node.op_type] += 1
            quantized.update(node.output)
        elif node.op_type != "Shape" and first in floats:
            fp32_nodes.append({"name": node.name, "op_type": node.op_type})
            floats.update(node.output)
    return {
        "int8_ops": dict(int8_ops.most_common()),
        "fp32_ops": dict(Counter(n["op_type"] for n in fp32_nodes).most_common()),
        "fp32_nodes": fp32_nodes,
        "quantize_linear": boundary["QuantizeLinear"],
        "dequantize_linear": boundary["DequantizeLinear"],
    }


#: Outputs whose head always stays in fp32 (the nodes that only these outputs depend on: for ``class_logits`` the
#: pooling, the linear classifier, the metadata evidence). Quantized, the class scores have 256 levels, two classes
#: often share the top one, and the ISIC scorer counts a tied maximum as wrong: on the CPU recipe's checkpoint, 31 of
#: 1,137 test images were tied, 0.006 of balanced accuracy. The head is a few (B, C) operations: no measurable cost.
FP32_HEADS = ("class_logits",)


def _head_nodes(graph: Any, output: str) -> set[str]:
    """Names of the nodes that ``output`` depends on and no other graph output does."""
    producer = {o: n for n in graph.node for o in n.output}

    def ancestors(name: str) -> set[str]:
        seen: set[str] = set()
        stack = [name]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    others = [ancestors(o.name) for o in graph.output if o.name != output]
    return ancestors(output).difference(*others)


def _fp32_nodes(path: Path, keep_fp32: str, op_types: Sequence[str] = ()) -> list[str]:
    """Names of the nodes left in fp32, in graph order: those that read the graph's inputs (``first``) and/or write
    its outputs (``last``), the nodes of ``op_types``, and the :data:`FP32_HEADS` always."""
    import onnx

    graph = onnx.load(str(path)).graph
    inputs, outputs = {i.name for i in graph.input}, {o.name for o in graph.output}
    heads = set().union(*(_head_nodes(graph, o) for o in FP32_HEADS if o in outputs))
    return [
        node.name
        for node in graph.node
        if ("first" in keep_fp32 and inputs & set(node.input))
        or ("last" in keep_fp32 and outputs & set(node.output))
        or node.op_type in op_types
        or node.name in heads
    ]


def quantize_int8(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Sequence[Record],
    *,
    method: str = "percentile",
    per_channel: bool = True,
    reduce_range: bool = True,
    keep_fp32: str = "first",
    nodes_to_exclude: Sequence[str] = (),
    fp32_op_types: Sequence[str] = (),
    batch_size: int = 8,
) -> dict[str, Any]:
    """Quantize a skinfusion fp32 ONNX export to int8 (QDQ) with ``calibration`` images; no guard, no atomicity.

    Args:
        fp32_path: an fp32 export (``skinfusion export --format onnx``); its record is read from it.
        out_path: the int8 file to write (overwritten).
        calibration: the calibration images.
        method: ``percentile`` (99.999th percentile of each activation's histogram), ``minmax`` or ``entropy``
            (:data:`CALIBRATION_METHODS`). On the CPU recipe's checkpoint (``experiments/quantize/int8_tradeoff.py``,
            881 validation images) percentile changed the top class of 1.4 % of images and no AKIEC, DF or VASC
            one; minmax changed 1.7 %, among them an AKIEC and a VASC image; both kept Dice within 1e-4.
        per_channel: one weight scale per output channel (else per tensor).
        reduce_range: 7-bit weights (see the module docstring).
        keep_fp32: layers left in fp32 (:data:`KEEP_FP32`). The default, ``first``, keeps the stem convolution,
            which sees the 3 normalised colour channels through one activation scale: on the tiny test network
            it halves the Dice difference to fp32 for a few percent of the compute. Whatever it says, the nodes
            computing the class logits from the pooled features stay in fp32 (:data:`FP32_HEADS`).
        nodes_to_exclude: more node names (of the pre-processed graph) left in fp32.
        fp32_op_types: operator types left in fp32 wherever they are (e.g. ``("Resize",)``).
        batch_size: calibration images per batch (1 for ``entropy`` and ``percentile``, whose histograms need
            batches of one shape).

    Returns:
        What went into the file's :data:`~skinfusion.inference.onnxnet.QUANTIZATION_KEY` metadata.

    Raises:
        ValueError: an unknown method or ``keep_fp32``.
        DataError: a calibration image cannot be read.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"unknown calibration method {method!r}; choose one of {list(CALIBRATION_METHODS)}")
    if keep_fp32 not in KEEP_FP32:
        raise ValueError(f"unknown keep_fp32 {keep_fp32!r}; choose one of {list(KEEP_FP32)}")
    fp32 = OnnxNet(fp32_path)
    if method != "minmax":
        batch_size = 1
    reader = CalibrationReader(calibration, fp32.settings, meta=fp32.meta_dim > 0, batch_size=batch_size)
    calibrate = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy}.get(
        method, CalibrationMethod.Percentile
    )
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "preprocessed.onnx"
        try:
            # The exporter's symbolic batch axis defeats ONNX Runtime's symbolic shape inference; ONNX's is enough.
            quant_pre_process(str(fp32_path), str(source), skip_symbolic_shape=True)
        except Exception as error:  # an optimisation, not a requirement
            log.warning("quant_pre_process failed (%s): quantizing the export as it is", error)
            source = Path(fp32_path)
        excluded = [*_fp32_nodes(source, keep_fp32, fp32_op_types), *nodes_to_exclude]
        quantize_static(
            str(source),
            str(out_path),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=per_channel,
            reduce_range=reduce_range,
            calibrate_method=calibrate,
            # (not CalibMaxIntermediateOutputs: onnxruntime 1.32 drops the batches it collected when it is reached;
            # min/max calibration keeps two numbers per tensor and batch anyway)
            nodes_to_exclude=excluded,
        )
    info = {
        "dtype": "int8",
        "format": "QDQ",
        "activations": "uint8",
        "weights": "int8 per channel" if per_channel else "int8 per tensor",
        "reduce_range": reduce_range,
        "calibration": {"method": method, "images": reader.num_images},
        "keep_fp32": keep_fp32,
        "nodes_excluded": excluded,
    }
    model = onnx.load(str(out_path))
    metadata = {p.key: p.value for p in model.metadata_props}
    metadata.update({**fp32.settings.to_metadata(), QUANTIZATION_KEY: json.dumps(info)})
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, str(out_path))
    return info


def _scores(model: OnnxNet, records: Sequence[Record], folder: Path, batch_size: int) -> dict[str, Any]:
    """``skinfusion evaluate``'s metrics of ``model`` on ``records`` (predictions written under ``folder``)."""
    from skinfusion.evaluation.report import score_predictions
    from skinfusion.inference.predictor import Predictor
    from skinfusion.inference.writers import CSV_NAME, MASKS_DIR

    predictor = Predictor(model, batch_size=batch_size, progress=False)
    predictor.write(predictor.predict_records(records), folder, masks=True, csv=True)
    masks, csv = folder / MASKS_DIR, folder / CSV_NAME
    metrics, _, _ = score_predictions(records, masks if masks.is_dir() else None, csv if csv.is_file() else None)
    return metrics


def _agreement(fp32_dir: Path, int8_dir: Path, records: Sequence[Record], class_names: Sequence[str]):
    """How often the two models agree: top-1 class, and the mean Dice between their masks."""
    from skinfusion.evaluation.isic import read_classification_csv, read_segmentation_mask, segmentation_image_scores
    from skinfusion.inference.writers import CSV_NAME, MASKS_DIR, mask_filename

    agreement: dict[str, float] = {}
    if (fp32_dir / CSV_NAME).is_file():
        ids, fp32 = read_classification_csv(fp32_dir / CSV_NAME, class_names)
        ids_int8, int8 = read_classification_csv(int8_dir / CSV_NAME, class_names)
        if list(ids) != list(ids_int8):
            order = {i: k for k, i in enumerate(ids_int8)}
            int8 = int8[[order[i] for i in ids]]
        agreement["top1_agreement"] = float((fp32.argmax(1) == int8.argmax(1)).mean())
        agreement["max_probability_difference"] = float(np.abs(fp32 - int8).max())
        # Balanced accuracy weighs each class equally: one changed image of a class with 2 guard images moves it
        # by 1/(2K). Say per true class how many of its images changed class, so that such a refusal reads as such.
        label = {r.id: r.label for r in records}
        changed = fp32.argmax(1) != int8.argmax(1)
        truth = [label.get(i) for i in ids]
        agreement["top1_changed_per_class"] = {
            c: [int(sum(ch for t, ch in zip(truth, changed, strict=True) if t == c)), truth.count(c)]
            for c in class_names
            if c in truth
        }
    names = [mask_filename(r.id) for r in records if (fp32_dir / MASKS_DIR / mask_filename(r.id)).is_file()]
    if names:
        dice = [
            segmentation_image_scores(
                read_segmentation_mask(int8_dir / MASKS_DIR / name), read_segmentation_mask(fp32_dir / MASKS_DIR / name)
            )["dice"]
            for name in names
        ]
        agreement["mask_dice_int8_vs_fp32"] = float(np.mean(dice))
    return agreement


def _changed_text(changed: dict[str, list[int]]) -> str:
    """``{"MEL": [1, 27], ...}`` (changed, guard images) -> ``"MEL 1 of 27, ..."``."""
    return ", ".join(f"{c} {k} of {n}" for c, (k, n) in changed.items())


def accuracy_guard(
    fp32: OnnxNet, int8: OnnxNet, records: Sequence[Record], tolerance: float = 0.005, batch_size: int = 8
) -> dict[str, Any]:
    """Score both models on ``records`` (:data:`GUARD_METRICS`) and refuse the int8 one where a metric moved.

    A label outside the models' classes counts as unknown; a metric without ground truth (no masks, or no
    labels) is not compared.

    Returns:
        ``{"images", "tolerance", "metrics": {name: {"fp32", "int8", "difference"}}, "agreement": {...}, "passed"}``.

    Raises:
        QuantizationError: some metric differs by more than ``tolerance`` (the message names each, with both
            values and the tolerance), or no metric could be compared.
    """
    import dataclasses

    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    class_names = fp32.settings.class_names
    records = [r if r.label in class_names else dataclasses.replace(r, label=None) for r in records]
    records = [r for r in records if r.mask is not None or r.label is not None]
    if not records:
        raise QuantizationError("no guard image has ground truth (a mask or a label): cannot check the int8 model")
    with tempfile.TemporaryDirectory() as folder:
        fp32_dir, int8_dir = Path(folder) / "fp32", Path(folder) / "int8"
        scores = {
            "fp32": _scores(fp32, records, fp32_dir, batch_size),
            "int8": _scores(int8, records, int8_dir, batch_size),
        }
        agreement = _agreement(fp32_dir, int8_dir, records, class_names)
    metrics: dict[str, dict[str, float]] = {}
    failed: list[str] = []
    for name, (key, label) in GUARD_METRICS.items():
        before, after = scores["fp32"].get(key, math.nan), scores["int8"].get(key, math.nan)
        if math.isnan(before) and math.isnan(after):
            continue  # no ground truth of this kind
        difference = after - before
        metrics[name] = {"fp32": before, "int8": after, "difference": difference}
        if not abs(difference) <= tolerance:  # NaN on one side fails too
            failed.append(
                f"{label}: int8 {after:.4f} vs fp32 {before:.4f}, |difference| {abs(difference):.4f} > "
                f"tolerance {tolerance}"
            )
    if not metrics:
        raise QuantizationError("the guard images give no metric to compare")
    result = {
        "images": len(records),
        "tolerance": tolerance,
        "metrics": metrics,
        "agreement": agreement,
        "passed": not failed,
    }
    if failed:
        changed = agreement.get("top1_changed_per_class", {})
        if changed:
            failed.append(f"images whose top-1 class changed, per true class: {_changed_text(changed)}")
        error = QuantizationError(f"int8 model refused (accuracy guard on {len(records)} images): " + "; ".join(failed))
        error.result = result
        raise error
    return result


def report_path(path: str | Path, suffix: str = ".json") -> Path:
    """``model.onnx`` -> ``model.quantization.json`` (or ``.md``): the report beside a quantized file."""
    path = Path(path)
    return path.with_name(f"{path.stem}.quantization{suffix}")


def _markdown(report: dict[str, Any]) -> str:
    sizes, runtime, guard = report["size_bytes"], report["runtime"], report["guard"]
    info = report["quantization"]
    lines = [
        f"# int8 quantization of `{Path(report['fp32']).name}`",
        "",
        f"{info['format']}, activations {info['activations']}, weights {info['weights']}"
        f"{' (7-bit range)' if info['reduce_range'] else ''}; calibration {info['calibration']['method']} on "
        f"{info['calibration']['images']} images ({report['calibration_source']}).",
        "",
        "| file | size (MB) |",
        "| --- | ---: |",
        f"| fp32 | {sizes['fp32'] / 2**20:.2f} |",
        f"| int8 | {sizes['int8'] / 2**20:.2f} ({sizes['int8'] / sizes['fp32']:.0%}) |",
        "",
        f"## Accuracy guard: {guard['images']} images ({report['guard_source']}), tolerance {guard['tolerance']}",
        "",
        "| metric | fp32 | int8 | difference |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {GUARD_METRICS[name][1]} | {m['fp32']:.4f} | {m['int8']:.4f} | {m['difference']:+.4f} |"
        for name, m in guard["metrics"].items()
    ]
    agreement = dict(guard["agreement"])
    changed = agreement.pop("top1_changed_per_class", {})
    lines += ["", ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in agreement.items()), ""]
    if changed:
        lines += [
            f"Images whose top-1 class changed, per true class (changed of guard images): {_changed_text(changed)}",
            "",
        ]
    lines += [
        "## What runs in int8 and in fp32 (ONNX Runtime CPU, after QDQ fusion)",
        "",
        "int8 kernels: " + ", ".join(f"{op} x{n}" for op, n in runtime["int8_ops"].items()),
        "",
        f"fp32 nodes ({len(runtime['fp32_nodes'])}; {runtime['quantize_linear']} QuantizeLinear and "
        f"{runtime['dequantize_linear']} DequantizeLinear at the boundaries):",
        "",
    ]
    lines += [f"* `{n['name']}` ({n['op_type']})" for n in runtime["fp32_nodes"]] or ["* none"]
    return "\n".join(lines) + "\n"


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    calibration: Sequence[Record],
    guard: Sequence[Record],
    tolerance: float = 0.005,
    calibration_source: str = "",
    guard_source: str = "",
    fp32_name: str | None = None,
    batch_size: int = 8,
    **options: Any,
) -> dict[str, Any]:
    """Quantize ``fp32_path`` to int8, check it with :func:`accuracy_guard`, and write it with its report.

    Args:
        fp32_path: an fp32 skinfusion ONNX export.
        out_path: the int8 ``.onnx`` file; replaced atomically, and only when the guard accepts it.
        calibration, guard: the images of :func:`select_images`; ``*_source`` say where they come from (report).
        fp32_name: how the report names the fp32 model (default ``fp32_path``).
        tolerance: the largest accepted difference of each :data:`GUARD_METRICS` between int8 and fp32.
        options: :func:`quantize_int8`'s keyword arguments (``method``, ``per_channel``, ``reduce_range``...).

    Returns:
        The report (also written as ``<name>.quantization.json`` and ``.md`` beside ``out_path``).

    Raises:
        QuantizationError: the guard refuses the int8 model (nothing is written at ``out_path``).
    """
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        info = quantize_int8(fp32_path, tmp, calibration, batch_size=batch_size, **options)
        result = accuracy_guard(OnnxNet(fp32_path), OnnxNet(tmp), guard, tolerance, batch_size=batch_size)
        report = {
            "file": str(out_path),
            "fp32": fp32_name or str(fp32_path),
            "size_bytes": {"fp32": Path(fp32_path).stat().st_size, "int8": tmp.stat().st_size},
            "quantization": info,
            "calibration_source": calibration_source,
            "guard_source": guard_source,
            "guard": result,
            "runtime": runtime_precision(tmp),
        }
    atomic_write(report_path(out_path), json.dumps(report, indent=2))
    atomic_write(report_path(out_path, ".md"), _markdown(report))
    return report
