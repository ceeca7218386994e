"""A web demo of a trained model (``skinfusion demo``), built with Gradio.

Upload a dermoscopic image (or pick a synthetic example) and see the predicted lesion contour, a heat map
(the network's attention map, or Grad-CAM / Grad-CAM++ of the most probable class, stretched over the
image), the class probabilities, and the lesion mask with a download in the ISIC Task 1 format. Files that
are not images, or are over the byte or pixel limit, get a message in the page; no input makes the app fail.

Without ``--ckpt`` the demo first trains a toy model: a tiny network fitted on synthetic lesions, cached
under ``$SKINFUSION_CACHE`` (default ``~/.cache/skinfusion``) so that later starts load it at once. It
knows nothing about real skin, and the page says so.

Gradio is an optional dependency: ``pip install "skinfusion[demo]"``. :func:`build_demo` makes the app
from a :class:`~skinfusion.Predictor` without starting it; :func:`launch` starts it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from skinfusion.data.dataset import META_FIELDS as META_KEYS
from skinfusion.data.dataset import SEXES, SITES
from skinfusion.data.records import Record
from skinfusion.inference.explain import EXPLAIN_METHODS
from skinfusion.io import atomic_path, atomic_write

if TYPE_CHECKING:
    import gradio as gr

    from skinfusion import Predictor
    from skinfusion.inference.predictor import Prediction

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_BYTES",
    "DEFAULT_MAX_PIXELS",
    "HEAT_MAP_METHODS",
    "ToyModel",
    "analyse",
    "build_demo",
    "demo_examples",
    "demo_main",
    "heat_map",
    "launch",
    "require_gradio",
    "toy_model",
]

#: Largest upload accepted, in bytes (also given to Gradio, which refuses bigger files before upload).
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
#: Largest image accepted, in pixels (checked from the file header, before decoding). ISIC 2018 Task 1
#: originals reach about 6000x4000 = 24 MP.
DEFAULT_MAX_PIXELS = 40_000_000
#: Longest side of the images shown in the page (the downloaded mask keeps the original size).
DISPLAY_SIDE = 512

#: Heat-map methods the demo offers (those of :func:`skinfusion.inference.explain.explain`): the network's
#: attention map, Grad-CAM and Grad-CAM++ of the most probable class.
HEAT_MAP_METHODS: tuple[str, ...] = EXPLAIN_METHODS
#: How the page names them.
_METHOD_LABELS = {"attention": "attention map", "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++"}

_INSTALL_HINT = 'The web demo needs Gradio, an optional extra: pip install "skinfusion[demo]"'
_PROMPT = "Upload a dermoscopic image (JPEG, PNG, BMP, TIFF or WebP) or pick an example."
_DISCLAIMER = "Research software: not a medical device, not for clinical decisions."
_ERROR_STYLE = "color:#8a1c1c;background:#fdecea;border:1px solid #f5c2c0;padding:8px 12px;border-radius:6px"


def require_gradio() -> Any:
    """Import Gradio, or raise an ``ImportError`` that says how to install it."""
    try:
        import gradio
    except ImportError as error:
        raise ImportError(f"{_INSTALL_HINT} (import failed: {error})") from error
    return gradio


#: How the toy model is made; part of its cache key, so a change here trains a new one.
TOY_CONFIG: dict[str, Any] = {
    "net": {
        "encoder": "test_resnet",
        "attention": "cbam",
        "attention_placement": ["skip", "classifier"],
        "decoder_channels": [16, 16, 8, 8, 8],
        "pretrained": False,
    },
    "data": {
        "synthetic_samples": 320,
        "synthetic_size": 64,
        "image_size": 48,
        "batch_size": 16,
        "normalization": "unit",
        "use_metadata": True,  # the synthetic lesions carry age, sex and site: the page's patient fields
        "metadata_dropout": 0.5,  # withheld from half the training images, so the image alone works too
        "fractions": (0.8, 0.2, 0.0),
        "num_workers": 0,
        "seed": 0,
    },
    "steps": 80,
    "lr": 0.003,
}


@dataclass
class ToyModel:
    """A cached toy checkpoint and what to tell users about it."""

    path: Path
    steps: int
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)
    trained_now: bool = False

    def describe(self) -> str:
        """Markdown for the page: a toy, how it was made, and how to use a real model instead."""
        scores = ", ".join(f"{name} {self.metrics[key]:.2f}" for key, name in _TOY_SCORES if key in self.metrics)
        scores = f" (validation on synthetic lesions: {scores})" if scores else ""
        return (
            f"⚠️ **Toy model, for trying the app only.** A tiny network trained for {self.steps} steps on "
            f"{self.samples} synthetic lesions{scores}. It has never seen real skin: its answers on real "
            "images mean nothing. Start `skinfusion demo --ckpt CKPT` with a trained checkpoint instead."
        )


_TOY_SCORES = (("val/dice", "Dice"), ("val/accuracy", "accuracy"))


def cache_dir() -> Path:
    """``$SKINFUSION_CACHE`` or ``~/.cache/skinfusion``."""
    return Path(os.environ.get("SKINFUSION_CACHE", "~/.cache/skinfusion")).expanduser()


def toy_model(cache: str | Path | None = None, config: dict[str, Any] | None = None) -> ToyModel:
    """The toy model's checkpoint: loaded from the cache, or trained on synthetic lesions and cached.

    Args:
        cache: cache folder (default :func:`cache_dir`); the model goes to ``demo/toy-<key>.ckpt``,
            where the key hashes ``config``, the skinfusion version and the synthetic-data version.
        config: overrides of :data:`TOY_CONFIG` (``net`` and ``data`` merged key by key; ``steps``, ``lr``).
    """
    import skinfusion
    from skinfusion.data.synthetic import SYNTHETIC_VERSION

    base = TOY_CONFIG if config is None else _merge(TOY_CONFIG, config)
    folder = (Path(cache).expanduser() if cache is not None else cache_dir()) / "demo"
    text = json.dumps([base, skinfusion.__version__, SYNTHETIC_VERSION], sort_keys=True, default=list)
    key = hashlib.sha256(text.encode()).hexdigest()[:12]
    path = folder / f"toy-{key}.ckpt"
    info_path = folder / f"toy-{key}.json"
    if path.is_file() and info_path.is_file():
        info = json.loads(info_path.read_text())
        return ToyModel(path, info["steps"], info["samples"], info.get("metrics", {}))
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    metrics = _train_toy(base, path, folder / "synthetic")
    info = {"steps": base["steps"], "samples": base["data"]["synthetic_samples"], "metrics": metrics}
    info["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write(info_path, json.dumps(info, indent=1))  # after the checkpoint: its presence means both are complete
    log.info("trained the demo's toy model in %.1f s: %s", info["seconds"], path)
    return ToyModel(path, info["steps"], info["samples"], metrics, trained_now=True)


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = {**base[key], **value} if isinstance(base.get(key), dict) else value
    return merged


def _train_toy(config: dict[str, Any], path: Path, data_root: Path) -> dict[str, float]:
    """Fit the toy network with Lightning, save its checkpoint atomically, return validation metrics."""
    import functools

    import pytorch_lightning as pl
    import torch

    from skinfusion import SkinFusionDataModule, SkinFusionModule, SkinFusionNet
    from skinfusion.training.schedule import WarmupCosine

    pl.seed_everything(int(config["data"].get("seed", 0)), verbose=False)
    data = SkinFusionDataModule(root=str(data_root), **config["data"])
    net = SkinFusionNet(num_classes=data.num_classes, meta_dim=data.meta_dim, **config["net"])
    optimizer = functools.partial(torch.optim.AdamW, lr=config["lr"], weight_decay=1e-4)
    module = SkinFusionModule(  # a short run ends well with the learning rate decayed
        net, optimizer=optimizer, scheduler=WarmupCosine, class_names=list(data.class_names), train_metrics=False
    )
    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    cpu = {"accelerator": "cpu", "devices": 1, **quiet}
    trainer = pl.Trainer(
        max_steps=config["steps"], enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, **cpu
    )
    trainer.fit(module, datamodule=data)
    with atomic_path(path, fsync=True) as tmp:
        trainer.save_checkpoint(tmp, weights_only=True)
    results = pl.Trainer(**cpu).validate(module, datamodule=data, verbose=False)
    return {k: float(v) for k, v in (results[0] if results else {}).items() if k in dict(_TOY_SCORES)}


def demo_examples(folder: str | Path | None = None, size: int = 256) -> list[Path]:
    """Write (once) and return the demo's example images: one synthetic lesion per class shown.

    Synthetic, so that the package ships no image data (the ISIC images are CC BY-NC).
    """
    from PIL import Image

    from skinfusion.data.records import ISIC_CLASSES
    from skinfusion.data.synthetic import SYNTHETIC_VERSION, make_lesion

    folder = Path(folder) if folder is not None else cache_dir() / "demo" / f"examples-v{SYNTHETIC_VERSION}-{size}"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(("MEL", "NV", "BCC", "VASC")):
        path = folder / f"synthetic_{name}.png"
        if not path.is_file():
            image, _, _ = make_lesion(1000 + index, seed=7, size=size, class_index=ISIC_CLASSES.index(name))
            with atomic_path(path) as tmp:
                Image.fromarray(image).save(tmp, format="PNG")
        paths.append(path)
    return paths


@dataclass
class Analysis:
    """What the page shows for one input: either ``error`` or the results."""

    error: str | None = None
    summary: str = ""
    contour: np.ndarray | None = None
    heat: np.ndarray | None = None
    mask_preview: np.ndarray | None = None
    probabilities: dict[str, float] | None = None
    mask_file: Path | None = None
    inputs: dict[str, Any] | None = None


def heat_map(
    predictor: Predictor, prediction: Prediction, method: str = "attention", size: tuple[int, int] | None = None
) -> np.ndarray:
    """The heat map of ``method`` for one prediction: (height, width) float32 in [0, 1].

    :func:`~skinfusion.inference.explain.explain` of the image prepared as ``predictor`` prepares its inputs,
    at the network's input resolution, stretched bilinearly to ``size`` (``(width, height)``; default the
    image's original size): the network's square input covers the whole image. Grad-CAM and Grad-CAM++
    explain the prediction's most probable class.

    Raises:
        ValueError: a method the demo does not offer, or one this network cannot give (``attention`` from a
            network without attention maps, Grad-CAM from one without a classifier); the message says which.
        ImportError: Grad-CAM without ``pytorch-grad-cam`` (the ``grad-cam`` package) installed.
    """
    import cv2

    from skinfusion.data.records import Record
    from skinfusion.inference.explain import explain
    from skinfusion.inference.predictor import ImageDataset  # the predictor's own input preparation

    if method not in HEAT_MAP_METHODS:
        raise ValueError(f"unknown heat-map method {method!r}; choose from {list(HEAT_MAP_METHODS)}")
    record = prediction.record or Record(image=prediction.image)
    item = ImageDataset([record], predictor.image_size, predictor.normalization, meta=predictor.meta_dim > 0)[0]
    if "error" in item:
        raise item["error"]
    image = item["image"][None].to(predictor.device)
    meta = item["meta"][None].to(predictor.device) if predictor.meta_dim else None
    classes = None if prediction.probabilities is None else [int(np.argmax(prediction.probabilities))]
    heat = explain(predictor.net, image, method, classes=classes, meta=meta)[0]
    width, height = size if size is not None else prediction.size
    return cv2.resize(np.ascontiguousarray(heat), (width, height), interpolation=cv2.INTER_LINEAR).clip(0.0, 1.0)


def analyse(
    predictor: Predictor,
    path: str | Path | None,
    method: str = "attention",
    out_dir: str | Path | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    age: float | None = None,
    sex: str | None = None,
    site: str | None = None,
) -> Analysis:
    """Predict one uploaded file (``None``: nothing uploaded) and prepare what the page shows; never raises.

    ``out_dir`` is the folder for the mask download (default: a fresh temporary folder); ``max_pixels`` limits
    width x height, read from the header. ``age`` (years), ``sex`` and ``site`` are the patient's clinical
    metadata when the user has them (``None``: unknown); a network with a metadata branch reads them, and the
    summary and ``inputs`` say which inputs the prediction used. The result's ``error`` holds a message for the
    user when the input is unusable. A heat map the model cannot give leaves ``heat`` empty and says why in the
    summary.
    """
    import cv2

    from skinfusion.data.imageio import image_size, read_image
    from skinfusion.errors import DataError
    from skinfusion.inference.overlay import heatmap, render_overlay
    from skinfusion.inference.writers import mask_filename, write_mask

    if path is None or str(path) == "":
        return Analysis(error=_PROMPT)
    if method not in HEAT_MAP_METHODS:
        return Analysis(error=f"unknown heat-map method {method!r}; choose from {list(HEAT_MAP_METHODS)}")
    path = Path(path)
    name = path.name
    try:
        size = path.stat().st_size
    except OSError:
        return Analysis(error=f"Could not read the uploaded file {name}. Please upload it again.")
    if size > max_bytes:
        return Analysis(error=f"{name} is too large: {size / 2**20:.1f} MB (the limit is {max_bytes / 2**20:g} MB).")
    try:
        width, height = image_size(path, max_pixels=None)
    except DataError:
        return Analysis(error=f"{name} is not an image this demo can read. Upload a JPEG, PNG, BMP, TIFF or WebP file.")
    if width * height > max_pixels:
        return Analysis(
            error=f"{name} is too large: {width}x{height} = {width * height / 1e6:.1f} megapixels "
            f"(the limit is {max_pixels / 1e6:g} megapixels)."
        )
    if age is not None and not (isinstance(age, (int, float)) and 0 <= age <= 120):  # also NaN
        return Analysis(error=f"age must be a number of years between 0 and 120, got {age!r}")
    meta = {k: v for k, v in (("age", age), ("sex", sex), ("site", site)) if v not in (None, "")}
    try:
        prediction = next(iter(predictor.predict_records([Record(image=path, meta=meta)])))
        image = read_image(path, max_side=DISPLAY_SIDE, max_pixels=None)
    except DataError as error:
        return Analysis(error=f"{name} could not be decoded ({error.reason}). Is the file complete?")
    except Exception:  # the page must survive anything the model or a codec throws
        log.exception("demo: prediction failed for %s", path)
        return Analysis(error=f"Something went wrong while analysing {name}; see the server log.")
    label = _METHOD_LABELS.get(method, method)
    heat, heat_note = None, ""
    try:  # at the displayed image's size: the original's, or its downscaled copy for a big image
        heat = heat_map(predictor, prediction, method, size=(image.shape[1], image.shape[0]))
    except ValueError as error:  # a map this model cannot give
        heat_note = f"no {label}: {error}"
    except ImportError:
        heat_note = f"no {label}: it needs pytorch-grad-cam (pip install grad-cam)"
    except Exception:
        log.exception("demo: %s failed for %s", method, path)
        heat_note = f"the {label} failed; see the server log"
    result = Analysis()
    result.contour = render_overlay(image, prediction.mask)
    result.heat = heatmap(image, heat, alpha=0.5) if heat is not None else None
    lines = [f"**{prediction.id}** · {width}x{height} px"]
    if prediction.mask is not None:
        out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="skinfusion-demo-"))
        result.mask_file = out / mask_filename(prediction.id)
        write_mask(result.mask_file, prediction.mask)
        preview = np.where(prediction.mask, 255, 0).astype(np.uint8)
        result.mask_preview = cv2.resize(preview, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_NEAREST)
        lines.append(f"lesion covers {prediction.mask_area:.1%} of the image")
    else:
        lines.append("this model has no segmentation head")
    top = None
    if prediction.probabilities is not None:
        result.probabilities = dict(zip(prediction.class_names, map(float, prediction.probabilities), strict=True))
        top, prob = prediction.top_k(1)[0]
        lines.append(f"most probable: {top} ({prob:.0%})")
    of_top = f" of {top}" if method != "attention" and top is not None else ""
    lines.append(heat_note if heat is None else f"heat map: {label}{of_top}")
    result.inputs = {"image": True, **prediction.inputs}
    lines.append(describe_inputs(result.inputs, given=meta))
    result.summary = " · ".join(lines)
    return result


def describe_inputs(inputs: dict[str, Any], given: dict[str, Any] | None = None) -> str:
    """One line saying what a prediction used: the image, and which of age, sex and site (``inputs`` as in
    :attr:`~skinfusion.inference.predictor.Prediction.inputs`; ``given``: what the user entered)."""
    given = given or {}
    if not inputs.get("metadata_branch"):
        ignored = " (age, sex and site given are not read by it)" if given else ""
        return f"inputs used: the image only: this model reads no clinical metadata{ignored}"
    used = [f"{k} {v:g}" if k == "age" else f"{k} {v}" for k, v in inputs.items() if k in META_KEYS and v is not None]
    unread = [k for k in META_KEYS if inputs.get(k) is None and k in given]
    text = "inputs used: the image" + (", " + ", ".join(used) if used else " only (no age, sex or site given)")
    if unread:
        text += f"; not recognised: {', '.join(unread)}"
    return text


def build_demo(
    predictor: Predictor,
    *,
    model_info: str | None = None,
    examples: Sequence[str | Path] = (),
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> gr.Blocks:
    """The Gradio app for ``predictor`` (not started: call ``.launch()`` on it, or use :func:`launch`).

    Args:
        predictor: the model, e.g. ``Predictor("best.ckpt", progress=False)``.
        model_info: Markdown describing the model, shown at the top (e.g. :meth:`ToyModel.describe`).
        examples: example image files offered below the upload.
        max_bytes: largest accepted upload in bytes (pass the same to ``launch(max_file_size=...)``).

    Raises:
        ImportError: Gradio is not installed (the message says how to install it).
    """
    gr = require_gradio()
    work = Path(tempfile.mkdtemp(prefix="skinfusion-demo-"))
    names = ", ".join(predictor.class_names)

    reads_metadata = predictor.meta_dim > 0

    def run(path: str | None, method: str, age: str | None = None, sex: str | None = None, site: str | None = None):
        if not path:  # cleared, or nothing uploaded yet: a prompt, not an error
            return f'<div class="sf-prompt">{_PROMPT}</div>', None, None, None, None, None
        _forget_old(work)
        unknown = (None, "", "unknown")
        analysis = analyse(
            predictor,
            path,
            method,
            work / uuid.uuid4().hex,
            max_bytes,
            max_pixels,
            age=_parse_age(age),
            sex=None if sex in unknown else sex,
            site=None if site in unknown else site,
        )
        if analysis.error is not None:
            status = f'<div class="sf-error" role="alert" style="{_ERROR_STYLE}">⚠️ {_escape(analysis.error)}</div>'
            return status, None, None, None, None, None
        return (
            f'<div class="sf-ok">{_escape(analysis.summary)}</div>',
            analysis.contour,
            analysis.heat,
            analysis.mask_preview,
            analysis.probabilities,
            None if analysis.mask_file is None else str(analysis.mask_file),
        )

    with gr.Blocks(title="skinfusion demo", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(
            "# skinfusion: lesion segmentation and diagnosis\n"
            f"Upload a dermoscopic image; the network outlines the lesion and scores the classes ({names}). "
            f"{_DISCLAIMER}"
        )
        if model_info:
            gr.Markdown(model_info, elem_id="sf-model-info")
        with gr.Row():
            with gr.Column(scale=1):
                upload = gr.File(label="Dermoscopic image", file_count="single", type="filepath", elem_id="sf-upload")
                method = gr.Radio(
                    [(_METHOD_LABELS.get(m, m), m) for m in HEAT_MAP_METHODS],
                    value="attention",
                    label="Heat map",
                    elem_id="sf-method",
                )
                clinical = []
                if reads_metadata:  # the network's metadata branch reads them; unknown is a valid answer
                    with gr.Accordion("Patient (optional: leave unknown if you do not have it)", open=True):
                        clinical = [
                            gr.Textbox(label="Age (years)", placeholder="unknown", max_lines=1, elem_id="sf-age"),
                            gr.Dropdown(["unknown", *SEXES], value="unknown", label="Sex", elem_id="sf-sex"),
                            gr.Dropdown(
                                ["unknown", *SITES], value="unknown", label="Anatomical site", elem_id="sf-site"
                            ),
                        ]
                else:
                    gr.Markdown("This model reads the image only (no age, sex or site).", elem_id="sf-no-metadata")
                button = gr.Button("Analyse", variant="primary", elem_id="sf-run")
                if examples:
                    gr.Examples([[str(p)] for p in examples], inputs=[upload], label="Examples (synthetic lesions)")
            with gr.Column(scale=2):
                status = gr.HTML(f'<div class="sf-prompt">{_PROMPT}</div>', elem_id="sf-status")
                with gr.Row():
                    contour = gr.Image(label="Lesion contour", type="numpy", format="png", elem_id="sf-contour")
                    heat = gr.Image(label="Heat map", type="numpy", format="png", elem_id="sf-heat")
                    mask = gr.Image(label="Lesion mask", type="numpy", format="png", elem_id="sf-mask")
                with gr.Row():
                    probabilities = gr.Label(
                        label="Class probabilities", num_top_classes=len(predictor.class_names), elem_id="sf-probs"
                    )
                    download = gr.File(label="Mask (ISIC format)", interactive=False, elem_id="sf-download")
        outputs = [status, contour, heat, mask, probabilities, download]
        for trigger in (upload.change, button.click, method.change):
            trigger(run, inputs=[upload, method, *clinical], outputs=outputs)
    return demo


def _parse_age(text: str | float | None) -> float | str | None:
    """The age field: blank or "unknown" -> None, a number -> float, anything else as typed (analyse refuses it
    with a message). A text box, not a number field: a number field sends 0 when left empty."""
    if text is None or str(text).strip().lower() in ("", "unknown"):
        return None
    try:
        return float(text)
    except ValueError:
        return str(text)


def _escape(text: str) -> str:
    import html
    import re

    return re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", html.escape(text))  # the summary's bold image id


def _forget_old(work: Path, age_s: float = 3600.0) -> None:
    """Delete the mask downloads of requests older than ``age_s`` (Gradio serves its own copy)."""
    now = time.time()
    for folder in work.iterdir():
        try:
            if now - folder.stat().st_mtime > age_s:
                shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            pass


def launch(
    ckpt: str | Path | None = None,
    host: str = "127.0.0.1",
    port: int | None = None,
    device: str = "auto",
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    block: bool = True,
) -> gr.Blocks:
    """Build and start the demo for ``ckpt`` (or the toy model); ``block=False`` returns while it serves."""
    require_gradio()
    from skinfusion import Predictor

    if ckpt is None:
        print("No --ckpt given: using the toy model (trained once on synthetic lesions, then cached).", flush=True)
        toy = toy_model()
        if toy.trained_now:
            print(f"Trained and cached the toy model: {toy.path}", flush=True)
        ckpt, model_info = toy.path, toy.describe()
    else:
        model_info = f"**Model:** `{Path(ckpt).name}`"
    predictor = Predictor(ckpt, device=device, progress=False)
    demo = build_demo(
        predictor, model_info=model_info, examples=demo_examples(), max_bytes=max_bytes, max_pixels=max_pixels
    )
    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        max_file_size=max_bytes,
        prevent_thread_lock=not block,
        ssr_mode=False,
        share=False,
        footer_links=[],
    )
    return demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinfusion demo",
        description="Start a web demo (Gradio) of a trained model: upload a dermoscopic image and see the lesion "
        "contour, a heat map, the class probabilities, and download the ISIC-format mask. "
        'Needs the demo extra: pip install "skinfusion[demo]".',
    )
    parser.add_argument(
        "--ckpt",
        help="the model, as `skinfusion predict --ckpt` takes it (a skinfusion .ckpt or a safetensors export); "
        "default: a toy model trained on synthetic lesions once and cached under $SKINFUSION_CACHE "
        "(~/.cache/skinfusion)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860 or the next free one)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--max-mb", type=float, default=DEFAULT_MAX_BYTES / 2**20, help="largest upload in MB")
    parser.add_argument("--max-megapixels", type=float, default=DEFAULT_MAX_PIXELS / 1e6, help="largest image")
    return parser


def demo_main(argv: Sequence[str] | None = None) -> None:
    """``skinfusion demo``: serve the web demo until interrupted; exits with status 1 when Gradio is missing."""
    args = build_parser().parse_args(argv)
    try:
        require_gradio()
    except ImportError as error:
        print(f"skinfusion demo: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None
    launch(
        args.ckpt,
        host=args.host,
        port=args.port,
        device=args.device,
        max_bytes=int(args.max_mb * 2**20),
        max_pixels=int(args.max_megapixels * 1e6),
    )


if __name__ == "__main__":
    demo_main()
