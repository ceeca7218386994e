"""Explanations of a diagnosis: the network's own attention maps, or Grad-CAM / Grad-CAM++ of a class.

Grad-CAM weighs the final encoder features by the gradient of a class logit (Selvaraju et al., ICCV 2017;
Grad-CAM++: Chattopadhay et al., WACV 2018); the computation is ``pytorch-grad-cam``'s, run on the deepest
encoder stage, whose features feed both the classifier and, through the decoder and the fusion, the lesion
estimate the classifier may pool over. ``attention`` shows a map the network returns with every forward
(:func:`pick_attention`).

:func:`lesion_focus` measures whether a map looks at the lesion: the share of its mass inside the true mask
and whether its maximum lies inside (the pointing game, Zhang et al., ECCV 2016), against a uniform map.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "EXPLAIN_METHODS",
    "ClassLogits",
    "explain",
    "gradcam_layer",
    "lesion_focus",
    "measure_lesion_focus",
    "pick_attention",
]

#: What ``predict --explain`` and :func:`explain` accept.
EXPLAIN_METHODS = ("attention", "gradcam", "gradcam++")


class ClassLogits(nn.Module):
    """A network that returns only its class logits (what ``pytorch-grad-cam`` differentiates)."""

    def __init__(self, net: nn.Module, meta: Tensor | None = None) -> None:
        super().__init__()
        self.net = net
        self.meta = meta

    def forward(self, image: Tensor) -> Tensor:
        class_logits = self.net(image, self.meta).class_logits
        if class_logits is None:
            raise ValueError("Grad-CAM explains a class: this network has no classifier")
        return class_logits


def gradcam_layer(net: nn.Module) -> nn.Module:
    """The deepest encoder stage of a :class:`~skinfusion.nn.SkinFusionNet` (timm's last ``feature_info`` module)."""
    model = net.encoder.model
    return model.get_submodule(model.feature_info.module_name(-1))


def pick_attention(attention: Mapping[str, np.ndarray | Tensor], name: str | None = None):
    """The attention map ``name`` (default: the classifier's, else an encoder block's, else the deepest skip map).

    The encoder block map is the deepest one (highest stage, then block: ``layer4.2`` over ``layer3.5``). ``None``
    when the network returns no map.

    Raises:
        ValueError: no map ``name``.
    """
    if not attention:
        return None
    if name is not None:
        if name not in attention:
            raise ValueError(f"no attention map {name!r}; this network returns {sorted(attention)}")
        return attention[name]
    if "classifier" in attention:
        return attention["classifier"]
    return attention[sorted(attention, key=lambda key: (key.split(".")[0] != "skip", _level(key)))[-1]]


def _level(key: str) -> tuple[int, ...]:
    return tuple(int(n) for n in re.findall(r"\d+", key))  # encoder.layer4.2 -> (4, 2); skip.3 -> (3,)


def explain(
    net: nn.Module,
    image: Tensor,
    method: str = "gradcam",
    classes: Sequence[int] | None = None,
    meta: Tensor | None = None,
) -> np.ndarray:
    """Heat maps in [0, 1] at the input's resolution, one per image.

    Args:
        net: a :class:`~skinfusion.nn.SkinFusionNet` (any network with its ``encoder.model`` and output).
        image: (B,3,H,W) normalised input, on the network's device.
        classes: the class explained per image (Grad-CAM); default the top class of each.
        meta: the encoded metadata, for a network with a metadata branch.

    Returns:
        (B,H,W) float32 maps, each scaled to [0, 1] (an all-zero map where the method finds no evidence).

    Raises:
        ValueError: an unknown method, ``attention`` for a network that returns no attention map, or Grad-CAM
            of a network without PyTorch layers (an ONNX export).
    """
    if method not in EXPLAIN_METHODS:
        raise ValueError(f"unknown explanation {method!r}; choose one of {list(EXPLAIN_METHODS)}")
    height, width = image.shape[-2:]
    if method == "attention":
        with torch.no_grad():
            maps = pick_attention(net(image, meta).attention)
        if maps is None:
            raise ValueError("this network returns no attention map (attention is off): use gradcam")
        return attention_heat(maps, (height, width))

    if not hasattr(net, "encoder"):
        raise ValueError(
            f"{method} differentiates the PyTorch network; {type(net).__name__} has none (an ONNX export: use "
            "the checkpoint, or 'attention')"
        )
    from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    # Grad-CAM needs autograd whatever the caller runs under (no_grad, or the inference mode of a Lightning
    # validate/test loop, whose tensors autograd refuses: they are cloned out of it).
    with torch.inference_mode(False), torch.enable_grad():
        image = image.clone()
        model = ClassLogits(net, None if meta is None else meta.clone())
        if classes is None:
            with torch.no_grad():
                classes = model(image).argmax(1).tolist()
        cam_class = GradCAM if method == "gradcam" else GradCAMPlusPlus
        was_training = net.training
        net.eval()
        try:
            with cam_class(model=model, target_layers=[gradcam_layer(net)]) as cam:
                maps = cam(input_tensor=image, targets=[ClassifierOutputTarget(int(c)) for c in classes])
        finally:
            net.train(was_training)
    return np.asarray(maps, dtype=np.float32)


def attention_heat(maps: Tensor, size: tuple[int, int]) -> np.ndarray:
    """(B,1,h,w) attention maps upsampled bilinearly to ``size`` and min-max scaled per image: (B,H,W) float32."""
    maps = F.interpolate(maps.float(), size=size, mode="bilinear", align_corners=False)[:, 0]
    low = maps.flatten(1).min(1).values[:, None, None]
    high = maps.flatten(1).max(1).values[:, None, None]
    return ((maps - low) / (high - low).clamp_min(1e-12)).cpu().numpy().astype(np.float32)


def lesion_focus(heat: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """How much a heat map looks at the lesion.

    Args:
        heat: (H,W) non-negative map (any scale).
        mask: (H,W) boolean true lesion mask, same size.

    Returns:
        ``mass_inside`` (share of the map's mass inside the lesion; the uniform map's share when the map is
        all zero), ``pointing_hit`` (1 if the map's maximum is inside the lesion, else 0) and ``lesion_share``
        (the share of the image the lesion covers: the ``mass_inside`` of a uniform map).
    """
    heat = np.asarray(heat, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    if heat.shape != mask.shape:
        raise ValueError(f"heat map {heat.shape} and mask {mask.shape} differ in size")
    heat = np.clip(heat, 0.0, None)
    lesion_share = float(mask.mean())
    total = heat.sum()
    return {
        "mass_inside": float(heat[mask].sum() / total) if total > 0 else lesion_share,
        "pointing_hit": float(mask.flat[int(np.argmax(heat))]) if total > 0 else lesion_share,
        "lesion_share": lesion_share,
    }


def focus_maps(prediction: Any, methods: Sequence[str]) -> dict[str, np.ndarray]:
    """The maps of one prediction that :func:`measure_lesion_focus` scores (its ``heat``, and with ``attention`` in
    ``methods`` every attention map as ``attention <name>``), at the network's resolution."""
    maps = {} if prediction.heat is None else {prediction.explain_method: prediction.heat}
    if "attention" in methods:
        maps.update({f"attention {name}": heat for name, heat in prediction.attention.items()})
    return maps


def measure_lesion_focus(
    predictor: Any,
    records: Sequence[Any],
    methods: Sequence[str] = ("attention", "gradcam"),
    examples: int = 3,
    heats: Mapping[str, Mapping[str, np.ndarray]] | None = None,
) -> tuple[dict[str, dict[str, float]], list[np.ndarray]]:
    """Do the maps look at the lesion? :func:`lesion_focus` of every map, averaged over the images with a mask.

    Each map is compared at the network's input resolution with the true mask resized to it (nearest), the way
    the image itself was resized. ``attention`` in ``methods`` stands for every attention map the network returns;
    ``gradcam`` / ``gradcam++`` explain the predicted class. A ``uniform`` row gives what a map that looks
    everywhere scores: its mass inside, and its expected pointing-game hit rate, are the lesion's share of the image.
    ``heats`` (``{id: focus_maps(prediction, methods)}``) are maps already predicted, e.g. by the pass that wrote
    the predictions: only the images and methods they lack are predicted again.

    Returns:
        ``({map: {"mass_inside", "pointing_game", "images"}}, [overlays of the first ``examples`` images])``.
    """
    import copy

    import cv2

    from skinfusion.data.imageio import read_image, read_mask
    from skinfusion.inference.overlay import render_overlay

    unknown = [m for m in methods if m not in EXPLAIN_METHODS]
    if unknown:
        raise ValueError(f"unknown explanation {unknown}; choose from {list(EXPLAIN_METHODS)}")
    cams = [m for m in methods if m != "attention"]
    records = [r for r in records if r.mask is not None]
    heats = {image_id: dict(maps) for image_id, maps in (heats or {}).items()}
    for method in cams or [None]:  # one prediction run per Grad-CAM method; each also gives the attention maps
        key = method or "attention"
        todo = [r for r in records if not any(k.split(" ")[0] == key for k in heats.get(r.id, {}))]
        if not todo:
            continue
        run = copy.copy(predictor)
        run.explain = method
        for prediction in run.predict_records(todo):
            heats.setdefault(prediction.id, {}).update(focus_maps(prediction, methods))
    if "attention" in methods and not any(k.startswith("attention") for m in heats.values() for k in m):
        raise ValueError("this network returns no attention map (attention is off): measure gradcam only")
    size = predictor.image_size
    sums: dict[str, np.ndarray] = {}
    overlays: list[np.ndarray] = []
    for record in records:
        maps = heats.get(record.id)
        if not maps:
            continue
        mask = read_mask(record.mask).astype(bool)
        truth = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
        for name, heat in {"uniform": np.ones(truth.shape, np.float32), **maps}.items():
            if heat.shape != truth.shape:
                heat = cv2.resize(np.asarray(heat, np.float32), (size, size), interpolation=cv2.INTER_LINEAR)
            focus = lesion_focus(heat, truth)
            sums[name] = sums.get(name, 0.0) + np.array([focus["mass_inside"], focus["pointing_hit"], 1.0])
        if len(overlays) < examples:
            name = next((m for m in cams if m in maps), sorted(maps)[-1])
            lines = [f"{record.id}: {name}", "green: true lesion"]
            image = read_image(record.image)
            overlays.append(
                render_overlay(image, None, maps[name], lines, extra_mask=mask, extra_color=(0, 255, 0), alpha=0.45)
            )
    table = {}
    for name, (mass, hits, n) in sums.items():
        # A uniform map's argmax is arbitrary: its expected hit rate is the lesion's share, like its mass.
        hit_rate = mass / n if name == "uniform" else hits / n
        table[name] = {"mass_inside": float(mass / n), "pointing_game": float(hit_rate), "images": int(n)}
    return table, overlays
