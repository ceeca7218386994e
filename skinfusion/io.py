"""Weights and checkpoints: safe loading, one atomic writer, and the settings that travel with the model.

Nothing here unpickles arbitrary objects: ``.safetensors`` files are read with safetensors, everything else
with ``torch.load(weights_only=True)``, which refuses to build objects other than tensors and plain containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from skinfusion.errors import WeightsError

if TYPE_CHECKING:  # torch loads on first use: the atomic writers serve `prepare` too
    import torch

__all__ = [
    "InferenceSettings",
    "atomic_path",
    "atomic_save",
    "atomic_write",
    "load_checkpoint",
    "load_state_dict",
    "save_safetensors",
]


@dataclass(frozen=True)
class InferenceSettings:
    """What predict, evaluate and export need besides the weights; every checkpoint and export carries it.

    Attributes:
        net_config: the :class:`~skinfusion.nn.SkinFusionNet` arguments that rebuild the network.
        class_names: names of the class logits, in order.
        image_size: side of the square network input.
        normalization: input normalisation, ``"imagenet"`` or ``"unit"``.
    """

    net_config: dict[str, Any] = field(default_factory=dict)
    class_names: tuple[str, ...] = ()
    image_size: int = 224
    normalization: str = "imagenet"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.normalization not in ("imagenet", "unit"):
            raise ValueError(f"normalization must be 'imagenet' or 'unit', got {self.normalization!r}")
        config = {k: v for k, v in self.net_config.items() if k != "pretrained"}  # the weights come with the file
        object.__setattr__(self, "net_config", config)
        object.__setattr__(self, "class_names", tuple(self.class_names))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "class_names": list(self.class_names)}

    def to_metadata(self) -> dict[str, str]:
        """One JSON string per field (safetensors, ONNX and TorchScript metadata)."""
        return {key: json.dumps(value) for key, value in self.to_dict().items()}

    @classmethod
    def defaults_for(cls, net: Any) -> InferenceSettings:
        """A bare network's record (no checkpoint or export gave one): its config, the first ``num_classes`` ISIC
        classes, the default input settings."""
        from skinfusion.data.records import ISIC_CLASSES

        return cls(net.config, ISIC_CLASSES[: net.num_classes])

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> InferenceSettings:
        return cls(**{f.name: json.loads(metadata[f.name]) for f in fields(cls) if f.name in metadata})

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> InferenceSettings:
        """The record of a skinfusion checkpoint (one written before the record existed: rebuilt from its parts)."""
        hparams = checkpoint.get("hyper_parameters") or {}
        if "inference" in hparams:
            return cls(**hparams["inference"])
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        inputs = {k: data[k] for k in ("image_size", "normalization") if data.get(k) is not None}
        return cls(hparams.get("net_config") or {}, hparams.get("classes") or (), **inputs)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a ``.ckpt``/``.pt``/``.pth`` file without running code it may contain.

    Raises:
        WeightsError: the file is missing, not a torch file, or holds objects other than tensors and plain
            containers.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+)", str(err))  # the object it would build, not PyTorch's whole essay
        raise WeightsError(
            f"{path}: refused to load: it holds Python objects other than tensors and plain containers"
            f"{f' ({found[1]})' if found else ''}, which could run code when unpickled. Only load files you trust"
            " (--weights_only false); re-save them as safetensors or a plain state dict."
        ) from err
    except Exception as err:  # corrupt zip, truncated file, not a torch file...
        raise WeightsError(f"{path}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err
    return obj


def load_state_dict(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` file, a plain state dict, or a checkpoint (keys keep their prefixes).

    Raises:
        WeightsError: the file cannot be read safely or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err})") from err
    import torch

    obj = load_checkpoint(path, map_location)
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    elif isinstance(obj, Mapping) and isinstance(obj.get("model"), Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: holds no state dict (a mapping of parameter names to tensors)")
    return dict(obj)


def _fsync(path: str | Path) -> None:
    """Flush a file, or a rename in a folder, to disk (no-op where folders cannot be opened, e.g. Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` (its folder is created) that replaces ``path`` when the block succeeds.

    A crash leaves either the previous file or the new one, never a truncated one. The new file gets the mode
    a plain ``open()`` would give it, not ``mkstemp``'s owner-only ``0o600``. ``fsync``: flush the file and the
    rename to disk.

    Example:
        >>> with atomic_path("model.onnx") as tmp:
        ...     program.save(tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)  # the only way to read it; set straight back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
        if fsync:
            _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: str | Path, data: bytes | str, fsync: bool = False) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, fsync) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path`` atomically and durably (see :func:`atomic_path`)."""
    import torch

    with atomic_path(path, fsync=True) as tmp:
        torch.save(obj, tmp)


def save_safetensors(
    state_dict: Mapping[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write a state dict as safetensors, atomically (contiguous CPU copies, shared storage split)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
