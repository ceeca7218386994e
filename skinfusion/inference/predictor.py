"""Prediction on image files: lesion masks at the original resolution, the ISIC Task 3 CSV, overlays, JSON.

:class:`Predictor` reads each file upright, resizes it to the network's square input (training's ``predict``
transform), runs the network in batches (optionally with flip/rotation test-time augmentation), and resizes
the lesion *probability* map back to the original size before post-processing it
(:class:`~skinfusion.inference.postprocess.PostProcess`). :meth:`Predictor.write` writes::

    out_dir/
      masks/ISIC_0012345_segmentation.png   8-bit L, values {0,255}, original size (ISIC Task 1)
      predictions.csv                       image,MEL,NV,BCC,AKIEC,BKL,DF,VASC (ISIC Task 3)
      overlays/ISIC_0012345_overlay.png     contour + heat map (explanation, else attention) + top-3 classes
      json/ISIC_0012345.json                probabilities, predicted class, mask area, map names
      explanations/ISIC_0012345_gradcam.png with ``explain``: the top class's map, 8-bit, network size

Masks live in their own folder because the official scorer matches a prediction to an image by the
7-digit number in *any* file name of the folder. Every file is written atomically, and the CSV only once
all images are done, so an interrupted run never leaves a truncated file or a half-overwritten result.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from skinfusion.data.records import ISIC_CLASSES, Record
from skinfusion.errors import DataError, config_errors
from skinfusion.inference.inputs import collect_records
from skinfusion.inference.overlay import prediction_overlay
from skinfusion.inference.postprocess import PostProcess
from skinfusion.inference.writers import (
    CSV_NAME,
    JSON_DIR,
    MASKS_DIR,
    OVERLAYS_DIR,
    mask_filename,
    png_bytes,
    write_csv,
    write_mask,
)
from skinfusion.io import InferenceSettings, atomic_write
from skinfusion.nn import SkinFusionNet

log = logging.getLogger(__name__)

__all__ = ["Prediction", "Predictor", "add_predictor_arguments", "load_model", "predict_main", "predictor_from_args"]


@dataclass
class Prediction:
    """What the network says about one image.

    Attributes:
        size: upright original ``(width, height)``.
        mask: post-processed boolean lesion mask ``(height, width)`` at the original size, or
            ``None`` for a network without decoder.
        mask_prob: lesion probability map at the network resolution ``(S, S)``, or ``None``.
        probabilities: class probabilities ``(K,)`` (float64, sum 1), or ``None`` for a network
            without classifier.
        attention: spatial attention maps ``(h, w)`` in [0, 1], by name (``skip.4``, ``classifier``...).
        heat: with a :class:`Predictor` ``explain`` method, the explanation of the top class at the network's
            resolution ``(S, S)`` in [0, 1] (:attr:`explanation` gives it at the original size).
        explain_method: that method (``attention``, ``gradcam``, ``gradcam++``), else ``None``.
        inputs: what the prediction used besides the image: ``{"metadata_branch": the network reads clinical
            metadata, "age", "sex", "site": the value read (:func:`~skinfusion.data.dataset.read_metadata`), or
            None: not given, not recognised, or not read by this network}``.
    """

    id: str
    image: Path
    size: tuple[int, int]
    mask: np.ndarray | None
    mask_prob: np.ndarray | None
    probabilities: np.ndarray | None
    class_names: tuple[str, ...]
    attention: dict[str, np.ndarray] = field(default_factory=dict)
    record: Record | None = None
    heat: np.ndarray | None = None
    explain_method: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def explanation(self) -> np.ndarray | None:
        """:attr:`heat` resized bilinearly to the original ``(height, width)`` on each access (or ``None``)."""
        if self.heat is None:
            return None
        import cv2

        return np.clip(cv2.resize(self.heat, self.size, interpolation=cv2.INTER_LINEAR), 0.0, 1.0)

    @property
    def predicted_class(self) -> str | None:
        """Name of the most probable class (``None`` without classifier)."""
        if self.probabilities is None:
            return None
        return self.class_names[int(np.argmax(self.probabilities))]

    @property
    def mask_area(self) -> float | None:
        """Fraction of the image's pixels inside the predicted lesion (``None`` without decoder)."""
        return None if self.mask is None else float(self.mask.mean())

    def top_k(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most probable classes as ``(name, probability)``, most probable first."""
        if self.probabilities is None:
            return []
        order = np.argsort(-self.probabilities, kind="stable")[:k]
        return [(self.class_names[i], float(self.probabilities[i])) for i in order]

    def to_json(self) -> dict[str, Any]:
        """The per-image JSON document written by :meth:`Predictor.write`."""
        doc: dict[str, Any] = {"id": self.id, "image": str(self.image), "width": self.size[0], "height": self.size[1]}
        if self.inputs:
            doc["inputs"] = {"image": True, **self.inputs}
        if self.probabilities is not None:
            doc["probabilities"] = {n: float(p) for n, p in zip(self.class_names, self.probabilities, strict=True)}
            doc["predicted_class"] = self.predicted_class
        if self.mask is not None:
            doc["mask_area_fraction"] = self.mask_area
            doc["mask_file"] = mask_filename(self.id)
        doc["attention_maps"] = list(self.attention)
        if self.heat is not None:
            doc["explanation"] = {
                "method": self.explain_method,
                "class": self.predicted_class,
                "file": f"{EXPLANATIONS_DIR}/{explanation_filename(self.id, self.explain_method)}",
                "size": list(self.heat.shape[::-1]),  # network resolution, stretched over the whole image
            }
        return doc


EXPLANATIONS_DIR = "explanations"


def explanation_filename(image_id: str, method: str | None) -> str:
    """``<id>_<method>.png`` (``gradcam++`` written ``gradcampp``)."""
    return f"{image_id}_{(method or 'map').replace('+', 'p')}.png"


def load_model(path: str | Path) -> tuple[SkinFusionNet, InferenceSettings]:
    """The network of a Lightning checkpoint (loaded safely), a safetensors export, a ``save_pretrained`` /
    ``skinfusion export --format hf`` folder, or an ONNX export (an :class:`~skinfusion.inference.onnxnet.OnnxNet`
    run by ONNX Runtime), and its record.

    Raises:
        WeightsError: the file or folder cannot be loaded (the message names it and the problem).
    """
    if Path(path).is_dir():
        from skinfusion.nn.hub import load_pretrained

        return load_pretrained(path)
    if Path(path).suffix == ".safetensors":
        from skinfusion.inference.export import load_safetensors_export

        return load_safetensors_export(path)
    if Path(path).suffix == ".onnx":  # run by ONNX Runtime: an nn.Module returning the same output
        from skinfusion.inference.onnxnet import load_onnx

        return load_onnx(path)
    from skinfusion.training.module import SkinFusionModule

    module = SkinFusionModule.from_checkpoint(path)
    return module.net, module.settings


class ImageDataset(torch.utils.data.Dataset):
    """Reads, resizes and normalises the images of ``records`` (runs in DataLoader workers)."""

    def __init__(self, records: Sequence[Record], image_size: int, normalization: str, meta: bool) -> None:
        from skinfusion.data.transforms import build_transforms

        self.records = list(records)
        self.image_size = image_size
        self.transform = build_transforms("predict", image_size=image_size, normalization=normalization)
        self.meta = meta

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        from skinfusion.data.imageio import image_size, read_image

        record = self.records[index]
        try:
            width, height = image_size(record.image)
            # Decoding big JPEGs at reduced DCT scale: the shortest side stays >= the network input.
            rgb = read_image(record.image, max_side=self.image_size, side="shortest")
        except DataError as error:
            return {"index": index, "error": error}
        item: dict[str, Any] = {
            "index": index,
            "image": self.transform(image=rgb)["image"],
            "size": (width, height),
        }
        if self.meta:
            from skinfusion.data.dataset import encode_metadata

            item["meta"] = torch.from_numpy(encode_metadata(record.meta))
        return item


class Predictor:
    """Batched prediction on image files, with test-time augmentation and post-processing.

    Args:
        model: a :class:`~skinfusion.training.module.SkinFusionModule`, any ``nn.Module`` whose
            ``forward(image, meta=None)`` returns a :class:`~skinfusion.nn.output.SkinFusionOutput`, or
            the path of what :func:`load_model` loads.
        image_size: network input side; default: the model's record (:class:`~skinfusion.io.InferenceSettings`).
        normalization: ``"imagenet"`` or ``"unit"``; default: the model's record.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"auto"`` (CUDA when available).
        batch_size: images per forward pass.
        num_workers: DataLoader workers that decode images in parallel (0: in this process).
        tta: average the outputs over flips (4 views) ...
        rot90: ... and 90-degree rotations/transposes (8 views); implies ``tta``.
        postprocess: mask post-processing; default ``PostProcess()``.
        temperature: class logits are divided by it before the softmax (see
            :func:`skinfusion.evaluation.calibration.fit_temperature`).
        class_names: names of the class columns; default: the model's record (the first K ISIC classes for a
            bare network).
        skip_errors: log and skip unreadable images instead of raising :class:`DataError`.
        explain: ``attention``, ``gradcam`` or ``gradcam++``: each :class:`Prediction` gets its ``heat``.

    Raises:
        ValueError: a non-positive size/batch size/temperature, class names that do not match the network's
            number of classes, or an explanation the network cannot give.

    Example:
        >>> predictor = Predictor("best.ckpt", tta=True)
        >>> predictor.write(predictor.predict_paths("ISIC2018_Task1-2_Test_Input"), "out", overlays=True)
    """

    def __init__(
        self,
        model: nn.Module | str | Path,
        image_size: int | None = None,
        normalization: str | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 8,
        num_workers: int = 0,
        tta: bool = False,
        rot90: bool = False,
        postprocess: PostProcess | None = None,
        temperature: float = 1.0,
        class_names: Sequence[str] | None = None,
        skip_errors: bool = False,
        progress: bool = True,
        explain: str | None = None,
    ) -> None:
        from skinfusion.inference.explain import EXPLAIN_METHODS
        from skinfusion.training.module import SkinFusionModule

        if isinstance(model, (str, Path)):
            net, settings = load_model(model)
        elif isinstance(model, SkinFusionModule):
            net, settings = model.net, model.settings
        elif isinstance(model, SkinFusionNet):
            net, settings = model, InferenceSettings.defaults_for(model)
        elif isinstance(getattr(model, "settings", None), InferenceSettings):  # e.g. an OnnxNet: it has its record
            net, settings = model, model.settings
        else:  # a network of another type: its number of classes, if it says, and the arguments
            net = model
            settings = InferenceSettings(class_names=ISIC_CLASSES[: getattr(model, "num_classes", len(ISIC_CLASSES))])
        settings = replace(
            settings,
            image_size=image_size or settings.image_size,
            normalization=normalization or settings.normalization,
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if explain is not None and explain not in EXPLAIN_METHODS:
            raise ValueError(f"unknown explanation {explain!r}; choose one of {list(EXPLAIN_METHODS)}")
        config = getattr(net, "config", {})
        if explain == "attention" and config and not config.get("attention"):
            raise ValueError("explain='attention' needs a network with attention (this one has none): use gradcam")
        if explain in ("gradcam", "gradcam++") and config and not config.get("classifier", True):
            raise ValueError(f"explain={explain!r} explains a class: this network has no classifier")
        if not temperature > 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a positive number, got {temperature}")
        names = list(class_names or settings.class_names)
        if len(names) != len(settings.class_names):
            raise ValueError(f"{len(names)} class names {names} for a {len(settings.class_names)}-class network")
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.class_names = tuple(names)
        self.image_size = settings.image_size
        self.normalization = settings.normalization
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.tta = tta or rot90
        self.rot90 = rot90
        self.postprocess = postprocess if postprocess is not None else PostProcess()
        self.temperature = float(temperature)
        self.skip_errors = skip_errors
        self.progress = progress
        self.meta_dim = int(settings.net_config.get("meta_dim", 0))
        self.explain = explain

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_size={self.image_size}, normalization={self.normalization!r}, "
            f"device={str(self.device)!r}, batch_size={self.batch_size}, tta={self.tta}, rot90={self.rot90}, "
            f"temperature={self.temperature}, postprocess={self.postprocess!r})"
        )

    @torch.inference_mode()
    def forward(
        self, images: torch.Tensor, meta: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Run the network on a normalised batch (with TTA when enabled).

        Shape:
            images (B,3,S,S) -> mask probabilities (B,1,S,S) | None, class probabilities (B,K) | None,
            attention maps {name: (B,1,h,w)} (of the un-augmented view).
        """
        from skinfusion.inference.tta import tta_flips

        images = images.to(self.device, non_blocking=True)
        meta = None if meta is None else meta.to(self.device, non_blocking=True)
        attention: dict[str, torch.Tensor] = {}

        def run(view: torch.Tensor):
            output = self.net(view, meta)
            if not attention:  # tta_flips evaluates the identity view first
                attention.update(output.attention)
            return output

        if self.tta:
            mask_logits, class_logits = tta_flips(run, images, rot90=self.rot90)
        else:
            output = run(images)
            mask_logits, class_logits = output.mask_logits, output.class_logits
        mask_prob = None if mask_logits is None else mask_logits.float().sigmoid()
        class_prob = None if class_logits is None else (class_logits.float() / self.temperature).softmax(-1)
        return mask_prob, class_prob, {k: v.float() for k, v in attention.items()}

    def predict_paths(self, sources: Any, subset: str | None = None) -> Iterator[Prediction]:
        """Predict every image of ``sources`` (see :func:`collect_records`): a lazy iterator, in input order."""
        return self.predict_records(collect_records(sources, subset=subset))

    def predict_records(self, records: Sequence[Record]) -> Iterator[Prediction]:
        """Predict the images of ``records`` in batches (a lazy iterator, in input order).

        Every file's header is read here, before the iterator is returned: a file that is not an image fails
        the call before any prediction (or output file) is made.
        """
        records = [r for r in records if self._readable(r)]
        return self._predict_batches(records)

    def _predict_batches(self, records: list[Record]) -> Iterator[Prediction]:
        from tqdm.auto import tqdm

        dataset = ImageDataset(records, self.image_size, self.normalization, meta=self.meta_dim > 0)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=list,
            pin_memory=self.device.type == "cuda",
        )
        with tqdm(total=len(records), desc="predict", unit="img", disable=not self.progress) as bar:
            for items in loader:
                for item in items:
                    if "error" in item:
                        self._skip(item["error"])
                good = [item for item in items if "error" not in item]
                if good:
                    yield from self._predict_items(good, records)
                bar.update(len(items))

    def _readable(self, record: Record) -> bool:
        """Whether the file has a readable image header; if not it raises, or is skipped with ``skip_errors``."""
        from skinfusion.data.imageio import image_size

        try:
            image_size(record.image)
        except DataError as error:
            self._skip(error)
            return False
        return True

    def _skip(self, error: DataError) -> None:
        """Log an unreadable image with ``skip_errors``, else raise a :class:`DataError` that names the option."""
        if not self.skip_errors:
            hint = "(skip_errors=True, or --skip-errors, skips unreadable images)"
            raise DataError(error.path, f"{error.reason} {hint}") from None
        log.warning("skipping unreadable image: %s", error)

    def _predict_items(self, items: list[dict[str, Any]], records: Sequence[Record]) -> Iterator[Prediction]:
        images = torch.stack([item["image"] for item in items])
        meta = torch.stack([item["meta"] for item in items]) if self.meta_dim else None
        mask_prob, class_prob, attention = self.forward(images, meta)
        mask_prob = None if mask_prob is None else mask_prob[:, 0].cpu().numpy()
        class_prob = None if class_prob is None else class_prob.double().cpu().numpy()
        heat = None
        if self.explain == "attention":  # the maps the forward pass just returned: no second pass
            from skinfusion.inference.explain import attention_heat, pick_attention

            heat = attention_heat(pick_attention(attention), tuple(images.shape[-2:]))
        attention = {k: v[:, 0].cpu().numpy() for k, v in attention.items()}
        if self.explain in ("gradcam", "gradcam++"):
            from skinfusion.inference.explain import explain

            top = None if class_prob is None else class_prob.argmax(1).tolist()
            device_meta = None if meta is None else meta.to(self.device)
            heat = explain(self.net, images.to(self.device), self.explain, classes=top, meta=device_meta)
        for row, item in enumerate(items):
            record = records[item["index"]]
            width, height = item["size"]
            yield Prediction(
                id=record.id,
                image=Path(record.image),
                size=(int(width), int(height)),
                mask=None if mask_prob is None else self.postprocess(mask_prob[row], size=(width, height)),
                mask_prob=None if mask_prob is None else mask_prob[row],
                probabilities=None if class_prob is None else class_prob[row] / class_prob[row].sum(),
                class_names=self.class_names,
                attention={k: v[row] for k, v in attention.items()},
                record=record,
                heat=None if heat is None else heat[row],
                explain_method=self.explain,
                inputs=self._inputs(record),
            )

    def _inputs(self, record: Record) -> dict[str, Any]:
        from skinfusion.data.dataset import META_FIELDS, read_metadata

        if not self.meta_dim:
            return {"metadata_branch": False, **dict.fromkeys(META_FIELDS)}
        return {"metadata_branch": True, **read_metadata(record.meta)}

    def write(
        self,
        results: Iterable[Prediction],
        out_dir: str | Path,
        masks: bool = True,
        csv: bool = True,
        overlays: bool = False,
        json: bool = False,
        overlay_max_side: int | None = None,
        attention_map: str | None = None,
        csv_name: str = CSV_NAME,
    ) -> dict[str, Any]:
        """Write predictions to ``out_dir`` (layout in the module docstring); each file atomically.

        Args:
            results: predictions, e.g. :meth:`predict_paths`'s iterator (consumed here).
            masks, csv, overlays, json: which files to write.
            overlay_max_side: downscale overlays so that their longest side is at most this.
            attention_map: attention map shown in overlays (default: the classifier's, else the deepest).
            csv_name: file name of the CSV.

        Returns:
            ``{"num_images": n}`` and the folder (the CSV's path) of each kind of file written, else ``None``.
        """
        import json as json_module

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        ids: list[str] = []
        rows: list[np.ndarray] = []
        wrote_masks = False
        for prediction in results:
            ids.append(prediction.id)
            if masks and prediction.mask is not None:
                write_mask(out_dir / MASKS_DIR / mask_filename(prediction.id), prediction.mask)
                wrote_masks = True
            if csv and prediction.probabilities is not None:
                rows.append(prediction.probabilities)
            if overlays:
                overlay = prediction_overlay(prediction, attention_map=attention_map, max_side=overlay_max_side)
                atomic_write(out_dir / OVERLAYS_DIR / f"{prediction.id}_overlay.png", png_bytes(overlay))
            if prediction.heat is not None:
                name = explanation_filename(prediction.id, prediction.explain_method)
                heat_png = png_bytes((np.clip(prediction.heat, 0.0, 1.0) * 255).round().astype(np.uint8))
                atomic_write(out_dir / EXPLANATIONS_DIR / name, heat_png)
            if json:
                text = json_module.dumps(prediction.to_json(), indent=2)
                atomic_write(out_dir / JSON_DIR / f"{prediction.id}.json", text)
        csv_path = None
        if csv and rows:
            if len(rows) != len(ids):
                raise ValueError("some predictions have class probabilities and others not")
            csv_path = out_dir / csv_name
            write_csv(csv_path, ids, np.stack(rows), self.class_names)
        return {
            "num_images": len(ids),
            "masks": str(out_dir / MASKS_DIR) if wrote_masks else None,
            "csv": None if csv_path is None else str(csv_path),
            "overlays": str(out_dir / OVERLAYS_DIR) if overlays and ids else None,
            "json": str(out_dir / JSON_DIR) if json and ids else None,
            "explanations": str(out_dir / EXPLANATIONS_DIR) if self.explain and ids else None,
        }


def add_predictor_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the :class:`Predictor` options (model, input size, TTA, post-processing) to ``parser``."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--ckpt",
        required=True,
        help="skinfusion checkpoint (.ckpt), safetensors or ONNX export (run by ONNX Runtime), or an hf folder",
    )
    group.add_argument(
        "--image-size", type=int, default=None, help="network input side (default: checkpoint's, else 224)"
    )
    group.add_argument(
        "--normalization",
        choices=("imagenet", "unit"),
        default=None,
        help="input normalisation (default: checkpoint's)",
    )
    group.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    group.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default: 8)")
    group.add_argument(
        "--onnx-sessions",
        type=int,
        default=1,
        metavar="N",
        help="an ONNX --ckpt: N ONNX Runtime sessions side by side, each on its part of a batch and its share of the"
        " threads (more images/s at batch >= N on small CPUs; same outputs; default: 1)",
    )
    group.add_argument("--num-workers", type=int, default=0, help="image-decoding worker processes (default: 0)")
    group.add_argument("--tta", action="store_true", help="average over horizontal/vertical flips (4 views)")
    group.add_argument("--rot90", action="store_true", help="also 90-degree rotations and transposes (8 views)")
    group.add_argument("--temperature", type=float, default=1.0, help="divide class logits by T before softmax")
    post = parser.add_argument_group("mask post-processing")
    post.add_argument("--threshold", type=float, default=0.5, help="lesion where probability > this (default: 0.5)")
    post.add_argument("--opening-radius", type=int, default=0, help="morphological opening radius in pixels")
    post.add_argument("--min-size", type=int, default=0, help="drop components smaller than this many pixels")
    post.add_argument("--no-fill-holes", action="store_true", help="keep holes inside the lesion")
    post.add_argument("--no-largest-component", action="store_true", help="keep every component, not the largest")
    post.add_argument("--fallback", action="store_true", help="never output an empty mask (region around the peak)")


def predictor_from_args(args: argparse.Namespace) -> Predictor:
    """Build the :class:`Predictor` that :func:`add_predictor_arguments`'s options describe."""
    with config_errors():
        postprocess = PostProcess(
            threshold=args.threshold,
            fill_holes=not args.no_fill_holes,
            largest_component=not args.no_largest_component,
            opening_radius=args.opening_radius,
            min_size=args.min_size,
            fallback=args.fallback,
        )
        sessions = getattr(args, "onnx_sessions", 1)
        if sessions != 1 and (sessions < 1 or Path(args.ckpt).suffix != ".onnx"):
            raise ValueError(f"--onnx-sessions {sessions}: give N >= 1, with an ONNX export as --ckpt ({args.ckpt})")
        model = args.ckpt
        if sessions > 1:
            from skinfusion.inference.onnxnet import OnnxNet

            model = OnnxNet(args.ckpt, sessions=sessions)
        return Predictor(
            model,
            image_size=args.image_size,
            normalization=args.normalization,
            device=args.device,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            tta=args.tta,
            rot90=args.rot90,
            postprocess=postprocess,
            temperature=args.temperature,
            skip_errors=getattr(args, "skip_errors", False),
            progress=not getattr(args, "no_progress", False),
            explain=args.explain if isinstance(getattr(args, "explain", None), str) else None,
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinfusion predict",
        description=(
            "Predict lesion masks (ISIC Task 1 PNGs at the original image size) and diagnosis probabilities "
            "(ISIC Task 3 CSV) for image files, with optional overlays and per-image JSON."
        ),
        epilog=(
            "Outputs: OUT/masks/<id>_segmentation.png, OUT/predictions.csv, OUT/overlays/<id>_overlay.png, "
            "OUT/json/<id>.json. Example: skinfusion predict --ckpt best.ckpt ISIC2018_Task1-2_Test_Input "
            "--out submission --tta --overlays"
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders of images, ISIC 2018 layout folders, or manifest CSVs (image,mask,label,...)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--subset", default=None, help="ISIC subset when a layout folder holds several (e.g. Test)")
    add_predictor_arguments(parser)
    out = parser.add_argument_group("outputs")
    out.add_argument("--no-masks", action="store_true", help="do not write mask PNGs")
    out.add_argument("--no-csv", action="store_true", help="do not write the Task 3 CSV")
    out.add_argument("--overlays", action="store_true", help="write overlay PNGs (contour, attention, top-3)")
    out.add_argument("--json", action="store_true", help="write one JSON file per image")
    out.add_argument("--overlay-max-side", type=int, default=None, help="downscale overlays to this longest side")
    out.add_argument("--attention-map", default=None, help="attention map in overlays (default: classifier/deepest)")
    out.add_argument(
        "--explain",
        choices=("attention", "gradcam", "gradcam++"),
        default=None,
        help="explain the top class: its map in the overlays, explanations/<id>_<method>.png and the JSON",
    )
    out.add_argument("--csv-name", default=CSV_NAME, help=f"CSV file name (default: {CSV_NAME})")
    out.add_argument("--skip-errors", action="store_true", help="skip unreadable images instead of stopping")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def predict_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``skinfusion predict``: predict files, write masks, CSV, overlays and JSON; returns (and prints) the summary."""
    args = build_parser().parse_args(argv)
    predictor = predictor_from_args(args)
    summary = predictor.write(
        predictor.predict_paths(args.inputs, subset=args.subset),
        args.out,
        masks=not args.no_masks,
        csv=not args.no_csv,
        overlays=args.overlays,
        json=args.json,
        overlay_max_side=args.overlay_max_side,
        attention_map=args.attention_map,
        csv_name=args.csv_name,
    )
    print(json.dumps(summary, indent=2))
    return summary
