"""An exported ONNX file, run by ONNX Runtime, called like the PyTorch network.

:class:`OnnxNet` is an ``nn.Module`` whose ``forward(image, meta=None)`` returns the same
:class:`~skinfusion.nn.output.SkinFusionOutput` as :class:`~skinfusion.nn.SkinFusionNet`, so the
:class:`~skinfusion.inference.predictor.Predictor` (and with it ``predict``, ``evaluate`` and the demo) drives an
fp32 or int8 export (``skinfusion export --format onnx [--quantize int8]``) exactly as it drives a checkpoint:
``Predictor("model.onnx")``, ``skinfusion predict --ckpt model.onnx``. The inference record (class names, input
size, normalisation, network config) is read from the file's metadata.

What differs from the PyTorch network: no gradients (Grad-CAM needs the checkpoint; the attention maps come with
every forward), a fixed input side (the export's), and ONNX Runtime's execution providers instead of ``.to(device)``
(default CPU; outputs are returned on the input's device).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from skinfusion.errors import WeightsError
from skinfusion.io import InferenceSettings
from skinfusion.nn.output import SkinFusionOutput

__all__ = ["QUANTIZATION_KEY", "OnnxNet", "load_onnx"]

#: Metadata key of a quantized export: JSON of how it was quantized and calibrated.
QUANTIZATION_KEY = "skinfusion.quantization"


def _numpy(tensor: Tensor):
    return tensor.detach().to("cpu", torch.float32).contiguous().numpy()


class OnnxNet(nn.Module):
    """A skinfusion ONNX export run by ONNX Runtime, with the network's call signature and output type.

    Args:
        path: an ``.onnx`` file written by ``skinfusion export --format onnx`` (fp32 or ``--quantize int8``).
        providers: ONNX Runtime execution providers, in order of preference (default: CPU only).
        threads: intra-op threads (default: ONNX Runtime's, one per physical core); with ``sessions``, all of the
            sessions' together (default: PyTorch's thread count, one per physical core).
        session_options: an ``onnxruntime.SessionOptions`` to start from (``threads`` is applied to it).
        sessions: split every batch of 2 or more images over this many more sessions of the file, side by side,
            each with its share of the threads (``threads // sessions``); a single image runs on the main session
            with all of them. The outputs are the same (each image is computed alone either way); the speed is not:
            on the 2-core AVX2 VM, batch 16 of the CPU recipe's int8 file ran 2.34x eager fp32 with 2 sessions of 1
            thread against 2.04x with 1 session of 2 (``benchmarks/bench_inference.py --int8``). Memory: one more
            copy of the weights a session.

    Attributes:
        settings: the file's :class:`~skinfusion.io.InferenceSettings`.
        config: the network config of the record (``settings.net_config``), as ``SkinFusionNet.config``.
        image_size, in_chans, meta_dim, num_classes: what the file takes and returns.
        output_names: the file's outputs (``mask_logits``, ``class_logits``, ``attn/<name>``...).
        quantization: how a quantized export was made (its metadata), else ``None``.
        session: the ``onnxruntime.InferenceSession``.

    Raises:
        WeightsError: the file is missing, not an ONNX model, or not a skinfusion export.

    Shape:
        forward: image (B,C,S,S)[, meta (B,M)] -> ``SkinFusionOutput`` with mask_logits (B,1,S,S) | None,
        class_logits (B,K) | None, attention {name: (B,1,h,w)}.

    Example:
        >>> net = OnnxNet("model.int8.onnx")
        >>> output = net(torch.rand(2, 3, net.image_size, net.image_size))
        >>> Predictor(net).predict_paths("images/")  # or Predictor("model.int8.onnx")
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        session_options: Any = None,
        sessions: int = 1,
    ) -> None:
        super().__init__()
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise WeightsError(f"{path}: no such file")
        if sessions < 1:
            raise ValueError(f"sessions must be >= 1, got {sessions}")
        options = session_options if session_options is not None else onnxruntime.SessionOptions()
        providers = list(providers or ["CPUExecutionProvider"])

        def session(intra_op_threads: int | None) -> Any:
            if intra_op_threads:
                options.intra_op_num_threads = int(intra_op_threads)
            return onnxruntime.InferenceSession(str(path), options, providers=providers)

        try:
            self.session = session(threads)
            share = max(1, (threads or torch.get_num_threads()) // sessions)
            #: the sessions a batch is split over (none with ``sessions=1``: ``session`` runs every batch)
            self.sessions = [session(share) for _ in range(sessions)] if sessions > 1 else []
        except Exception as error:  # onnxruntime raises its own exception types (InvalidProtobuf, Fail...)
            raise WeightsError(f"{path}: ONNX Runtime cannot load it ({type(error).__name__}: {error})") from error
        self._pool: ThreadPoolExecutor | None = None  # started at the first batch it splits
        metadata = self.session.get_modelmeta().custom_metadata_map
        inputs = {i.name: i for i in self.session.get_inputs()}
        if "net_config" not in metadata or "image" not in inputs:
            raise WeightsError(f"{path}: not a skinfusion ONNX export (no net_config metadata or no 'image' input)")
        self.path = path
        self.settings = InferenceSettings.from_metadata(metadata)
        self.config: dict[str, Any] = dict(self.settings.net_config)
        shape = inputs["image"].shape  # ['batch', C, S, S]: the exporter fixes all but the batch axis
        self.in_chans = int(shape[1])
        self.image_size = int(shape[2])
        self.meta_dim = int(inputs["meta"].shape[1]) if "meta" in inputs else 0
        outputs = {o.name: o for o in self.session.get_outputs()}
        self.output_names = list(outputs)
        self.num_classes = (
            int(outputs["class_logits"].shape[1])
            if "class_logits" in outputs
            else int(self.config.get("num_classes", len(self.settings.class_names)))
        )
        self.quantization: dict[str, Any] | None = (
            json.loads(metadata[QUANTIZATION_KEY]) if QUANTIZATION_KEY in metadata else None
        )

    @property
    def decoder(self) -> str | None:
        """``"mask_logits"`` when the file segments, else ``None`` (the check callers make on ``SkinFusionNet``)."""
        return "mask_logits" if "mask_logits" in self.output_names else None

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def extra_repr(self) -> str:
        kind = "fp32" if self.quantization is None else self.quantization.get("dtype", "quantized")
        side = f"{self.in_chans}x{self.image_size}x{self.image_size}"
        return f"{str(self.path)!r}, {kind}, input {side}, {self.providers}"

    def forward(self, image: Tensor, meta: Tensor | None = None) -> SkinFusionOutput:
        """Run the file on a normalised batch; ``meta`` is required when the file has a ``meta`` input.

        Raises:
            ValueError: an input of another size or channel count than the export's, or a missing ``meta``.
        """
        expected = (self.in_chans, self.image_size, self.image_size)
        if image.ndim != 4 or tuple(image.shape[1:]) != expected:
            raise ValueError(
                f"{self.path.name} takes (B,{self.in_chans},{self.image_size},{self.image_size}) images, got "
                f"{tuple(image.shape)}: an ONNX export has a fixed input side (export again with --image-size)"
            )
        feed = {"image": _numpy(image)}
        if self.meta_dim:
            if meta is None:
                raise ValueError(f"this model has a metadata input (meta_dim={self.meta_dim}); pass meta")
            feed["meta"] = _numpy(meta)
        values = dict(zip(self.output_names, self._run(feed, len(image)), strict=True))
        tensors = {name: torch.from_numpy(value).to(image.device) for name, value in values.items()}
        return SkinFusionOutput(
            tensors.get("mask_logits"),
            tensors.get("class_logits"),
            {name.removeprefix("attn/"): value for name, value in tensors.items() if name.startswith("attn/")},
        )

    def _run(self, feed: dict[str, Any], batch: int) -> list[Any]:
        """All outputs of the batch; split into one part a session (they release the GIL while they run)."""
        parts = min(len(self.sessions), batch)
        if parts < 2:  # sessions=1, or a single image: all the threads on it
            return self.session.run(self.output_names, feed)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(len(self.sessions), thread_name_prefix="onnxnet")
        bounds = np.linspace(0, batch, parts + 1).round().astype(int)
        futures = [
            self._pool.submit(session.run, self.output_names, {k: v[lo:hi] for k, v in feed.items()})
            for session, lo, hi in zip(self.sessions, bounds[:-1], bounds[1:], strict=False)
        ]
        results = [future.result() for future in futures]
        return [np.concatenate([result[i] for result in results]) for i in range(len(self.output_names))]

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.shutdown(wait=False)


def load_onnx(path: str | Path, **kwargs: Any) -> tuple[OnnxNet, InferenceSettings]:
    """``(OnnxNet(path, **kwargs), its record)``: the :func:`~skinfusion.inference.predictor.load_model` of an .onnx."""
    net = OnnxNet(path, **kwargs)
    return net, net.settings
