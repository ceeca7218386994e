"""Weights & Biases: a logger that falls back to offline mode by itself, the resolved config, and validation panels.

* :class:`WandbLogger`: Lightning's ``WandbLogger`` that writes an offline run (``wandb sync`` uploads it later)
  instead of failing or hanging without an API key or a connection to the W&B server.
* :class:`WandbConfig`: the resolved LightningCLI config in the run's config.
* :class:`WandbPanels`: validation images with mask overlays, attention and Grad-CAM heat maps, the confusion
  matrix and a per-class table.
"""

from __future__ import annotations

import logging
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import WandbLogger as _LightningWandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn
from torch.utils.data import default_collate

from skinfusion.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from skinfusion.inference.overlay import heatmap
from skinfusion.training.module import SkinFusionModule

__all__ = [
    "WandbConfig",
    "WandbLogger",
    "WandbPanels",
    "denormalize",
    "find_wandb_logger",
    "panel_indices",
    "resolve_wandb_mode",
    "server_reachable",
    "wandb_credentials_configured",
]

log = logging.getLogger(__name__)


def _base_url() -> str:
    """The W&B server wandb uses: ``WANDB_BASE_URL``, else a settings file's (``wandb login --host``), else its default.

    It is wandb's own resolved setting: ``wandb.setup()`` loads the settings once per process (environment, the
    global and the workspace settings files) without any network request, and starts wandb's service process,
    which the run's ``wandb.init`` then reuses.
    """
    import wandb

    return wandb.setup().settings.base_url


def wandb_credentials_configured() -> bool:
    """Whether wandb has credentials for its server, as ``wandb.login(prompt=False, verify=False)`` answers.

    wandb looks them up itself (``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, the netrc file that ``wandb
    login`` writes, for the server of its settings); it never prompts and does not verify the key. Without
    credentials it answers at once. With them it prints its "API key is configured" line; unless ``WANDB_SILENT``
    is set, it first asks the server whose key it is, for that line (through wandb's service process: up to about
    5 s without a server). An error from wandb counts as no credentials (logged at debug level); so does an open
    run, as ``wandb.login`` has no effect after ``wandb.init``.
    """
    try:
        import wandb

        return bool(wandb.login(prompt=False, verify=False))
    except Exception as error:  # a broken wandb setting must not stop training: wandb.init reports it
        log.debug(
            "W&B: wandb.login(prompt=False) failed (%s: %s); taken as no credentials", type(error).__name__, error
        )
        return False


def server_reachable(base_url: str | None = None, timeout: float = 2.0) -> bool:
    """Whether the W&B server answers an HTTP request to ``{base_url}/healthz`` within ``timeout`` seconds.

    Any HTTP answer counts, even an error status; a TCP connection alone does not, as sandboxes and captive
    networks often accept connections and never answer. The request goes through the ``HTTP(S)_PROXY``
    proxies, in a daemon thread, so neither a slow name lookup nor a silent peer blocks past ``timeout``.
    """
    url = (base_url or _base_url()).rstrip("/") + "/healthz"
    if urlsplit(url).scheme not in ("http", "https"):
        return False
    result: list[bool] = []

    def request() -> None:
        try:
            with urllib.request.urlopen(url, timeout=timeout):
                result.append(True)
        except urllib.error.HTTPError:  # the server is there, it answered
            result.append(True)
        except (OSError, ValueError):
            result.append(False)

    thread = threading.Thread(target=request, name="skinfusion-wandb-check", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def resolve_wandb_mode(offline: bool = False, timeout: float = 2.0) -> tuple[str | None, str | None]:
    """``("offline", reason)`` when a W&B run must fall back to offline mode, else ``(None, None)`` (wandb decides).

    ``offline=True`` or a ``WANDB_MODE`` of the user's is obeyed without any check. Otherwise the run falls back
    when wandb has no credentials (:func:`wandb_credentials_configured`) or its server does not answer
    (:func:`server_reachable`).
    """
    if offline or os.environ.get("WANDB_MODE", "").strip():
        return None, None
    if not wandb_credentials_configured():
        return "offline", "no API key found (set WANDB_API_KEY or run `wandb login`)"
    base_url = _base_url()
    if not server_reachable(base_url, timeout):
        return "offline", f"cannot reach {base_url} within {timeout:g} s"
    return None, None


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that runs offline by itself when W&B cannot be reached.

    On global rank 0, before the run starts, it asks wandb for credentials (:func:`wandb_credentials_configured`)
    and asks the server (:func:`server_reachable`); when either fails the run is written offline under
    ``{save_dir}/wandb/offline-run-*``, without checkpoint uploads, and one log line says why and how to
    upload it (``wandb sync``). A user's ``WANDB_MODE`` or ``offline=True`` is obeyed without any check.

    Each saved checkpoint's path is written to the run summary (``checkpoints/best``, ``checkpoints/last``,
    ``checkpoints/best_score``, ``checkpoints/monitor``), uploaded or not.

    Args:
        version: id of a run to resume.
        log_model: upload checkpoints as artifacts (``True``: at the end, ``"all"``: every save).
        connect_timeout: seconds the connectivity check may take.
        **kwargs: passed on to Lightning's ``WandbLogger`` and ``wandb.init`` (``entity``, ``tags``, ``group``...).
    """

    def __init__(
        self,
        name: str | None = None,
        save_dir: str = "runs",
        project: str = "skinfusion",
        version: str | None = None,
        offline: bool = False,
        log_model: Literal["all"] | bool = False,
        prefix: str = "",
        connect_timeout: float = 2.0,
        **kwargs: Any,
    ) -> None:
        # LightningCLI passes every wandb.init argument, unset ones as None; drop those so wandb's
        # and Lightning's own defaults (e.g. resume="allow") apply.
        kwargs = {key: value for key, value in kwargs.items() if value is not None}
        self.fallback_reason: str | None = None
        if rank_zero_only.rank == 0 and "mode" not in kwargs:
            mode, self.fallback_reason = resolve_wandb_mode(offline, connect_timeout)
            if mode is not None:
                # mode= rather than offline=True: Lightning's offline flag rewrites os.environ["WANDB_MODE"].
                kwargs["mode"] = mode
                log_model = False
                run_dir = Path(save_dir) / "wandb"
                log.warning(
                    "W&B: %s; logging offline to %s (upload later with `wandb sync %s`)",
                    self.fallback_reason,
                    run_dir,
                    run_dir / "offline-run-*",
                )
        Path(save_dir).mkdir(parents=True, exist_ok=True)  # wandb warns "git root ... does not exist" otherwise
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            version=version,
            offline=offline,
            log_model=log_model,
            prefix=prefix,
            **kwargs,
        )
        if self._wandb_init.get("anonymous") is None:
            # wandb >= 0.19 warns about any explicit `anonymous`, even None.
            self._wandb_init.pop("anonymous", None)

    @property
    def offline_mode(self) -> bool:
        """Whether the run is (or will be) written offline only."""
        mode = self._wandb_init.get("mode") or os.environ.get("WANDB_MODE", "")
        return self._offline or mode in ("offline", "dryrun")

    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: Any) -> None:
        super().after_save_checkpoint(checkpoint_callback)
        summary = getattr(self.experiment, "summary", None)
        if summary is None:
            return
        values = {
            "checkpoints/best": getattr(checkpoint_callback, "best_model_path", "") or None,
            "checkpoints/last": getattr(checkpoint_callback, "last_model_path", "") or None,
            "checkpoints/monitor": getattr(checkpoint_callback, "monitor", None),
        }
        score = getattr(checkpoint_callback, "best_model_score", None)
        if score is not None:
            values["checkpoints/best_score"] = float(score)
        for key, value in values.items():
            if value is not None:
                summary[key] = value


class WandbConfig(pl.Callback):
    """Put the resolved LightningCLI config (``model``, ``data``, ``trainer``, ...) into the W&B run's config.

    It does nothing without a W&B logger or outside LightningCLI.
    """

    def __init__(self) -> None:
        self._logged = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self._logged:
            self._log_config(trainer)
            self._logged = True

    @staticmethod
    def resolved_config(trainer: pl.Trainer) -> dict[str, Any] | None:
        """The config of the LightningCLI that built ``trainer`` as a plain dict, or ``None``."""
        import yaml
        from pytorch_lightning.cli import SaveConfigCallback

        saver = next((cb for cb in trainer.callbacks if isinstance(cb, SaveConfigCallback)), None)
        if saver is None:
            return None
        try:
            return yaml.safe_load(saver.parser.dump(saver.config, skip_none=False))
        except Exception as err:  # a config that cannot be dumped must not stop training
            log.warning("WandbConfig: could not dump the CLI config (%s); only hyperparameters are logged", err)
            return None

    @rank_zero_only
    def _log_config(self, trainer: pl.Trainer) -> None:
        logger = find_wandb_logger(trainer)
        config = self.resolved_config(trainer) if logger is not None else None
        if config:
            logger.experiment.config.update(config, allow_val_change=True)


MASK_LABELS = {0: "background", 1: "lesion"}


def find_wandb_logger(trainer: pl.Trainer) -> Any | None:
    """The trainer's first W&B logger (any subclass of Lightning's ``WandbLogger``), or ``None``."""
    return next((lg for lg in trainer.loggers if isinstance(lg, _LightningWandbLogger)), None)


def panel_indices(dataset_size: int, num_images: int) -> list[int]:
    """Indices of ``num_images`` samples spread evenly over a data set, always the same ones.

    Example: ``panel_indices(10, 4) == [0, 3, 6, 9]``.
    """
    if num_images < 1 or dataset_size < 1:
        return []
    if num_images >= dataset_size:
        return list(range(dataset_size))
    if num_images == 1:
        return [0]
    # A spacing of at least 1 keeps the rounded indices distinct.
    spacing = (dataset_size - 1) / (num_images - 1)
    return [round(i * spacing) for i in range(num_images)]


def denormalize(image: Tensor, normalization: Literal["unit", "imagenet"] = "unit") -> np.ndarray:
    """Undo the DataModule's normalisation for display: image (3,H,W) float -> uint8 array (H,W,3)."""
    image = image.detach().float().cpu()
    if normalization == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        image = image * std + mean
    elif normalization != "unit":
        raise ValueError(f"normalization must be 'unit' or 'imagenet', got {normalization!r}")
    return (image.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


class WandbPanels(pl.Callback):
    """Log validation panels to Weights & Biases after every ``every_n_epochs`` validation epochs.

    Logged keys (at the trainer's global step): ``val/panel`` (the images with ``prediction`` and
    ``ground_truth`` mask overlays, captioned with id, true and predicted class), ``val/attention/<map>``
    and ``val/gradcam`` (heat maps over the same images), ``val/confusion_matrix`` and ``val/per_class``
    (precision, recall, F1 and support).

    The images are the same every epoch, spread evenly over the validation set, and run through the network
    by rank 0 alone (no collective call that could deadlock under DDP). Without a W&B logger it does nothing.

    Args:
        attention_maps: names of the maps to show; ``None``: skip-level and classifier maps and the deepest
            encoder-block map; ``[]``: none.
        normalization: how the images were normalised; ``"auto"``: as the module's inference record says.
        mask_threshold: probability above which a predicted pixel is lesion.
        explain: ``gradcam`` or ``gradcam++`` for ``val/gradcam``, ``None``: none. A failure there logs one
            warning and turns the panel off; it never stops training.
    """

    def __init__(
        self,
        num_images: int = 8,
        every_n_epochs: int = 1,
        attention_maps: list[str] | None = None,
        normalization: Literal["auto", "unit", "imagenet"] = "auto",
        mask_threshold: float = 0.5,
        explain: Literal["gradcam", "gradcam++"] | None = "gradcam",
    ) -> None:
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if normalization not in ("auto", "unit", "imagenet"):
            raise ValueError(f"normalization must be 'auto', 'unit' or 'imagenet', got {normalization!r}")
        if not 0.0 < mask_threshold < 1.0:
            raise ValueError(f"mask_threshold must be in (0, 1), got {mask_threshold}")
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.attention_maps = None if attention_maps is None else list(attention_maps)
        self.normalization = normalization
        self.mask_threshold = mask_threshold
        if explain not in (None, "gradcam", "gradcam++"):
            raise ValueError(f"explain must be 'gradcam', 'gradcam++' or None, got {explain!r}")
        self.explain = explain
        self._said_noop = False

    # ------------------------------------------------------------------ hooks
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Runs after the module's on_validation_epoch_end, so the epoch's metrics and confusion matrix exist.
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        self._log_panels(trainer, pl_module)

    @rank_zero_only
    def _log_panels(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        logger = find_wandb_logger(trainer)
        if logger is None:
            if not self._said_noop:
                log.debug("WandbPanels: no WandbLogger among the trainer's loggers; nothing logged")
                self._said_noop = True
            return
        if not isinstance(pl_module, SkinFusionModule):
            return
        class_names = pl_module.class_names
        entries: dict[str, Any] = self._image_panels(trainer, pl_module, class_names)
        confmat = pl_module.last_confmat.get("val")
        if confmat is not None and class_names:
            entries["val/confusion_matrix"] = self._confusion_chart(confmat, class_names)
        table = self._per_class_table(trainer, class_names, confmat)
        if table is not None:
            entries["val/per_class"] = table
        if entries:
            logger.experiment.log({**entries, "trainer/global_step": trainer.global_step})

    # ------------------------------------------------------------------ parts
    @torch.no_grad()
    def _image_panels(
        self, trainer: pl.Trainer, pl_module: SkinFusionModule, class_names: list[str]
    ) -> dict[str, list[Any]]:
        import wandb

        loaders = trainer.val_dataloaders
        if isinstance(loaders, Sequence) and not isinstance(loaders, torch.utils.data.DataLoader):
            loaders = loaders[0] if loaders else None
        dataset = getattr(loaders, "dataset", None)
        if dataset is None or self.num_images == 0:
            return {}
        try:
            size = len(dataset)
        except TypeError:  # an iterable data set has no fixed samples to show
            return {}
        indices = panel_indices(size, self.num_images)
        if not indices:
            return {}
        batch = default_collate([dataset[i] for i in indices])
        batch = {k: v.to(pl_module.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        if trainer.datamodule is not None:  # e.g. uint8 -> normalised float with data.normalize_on_device
            batch = trainer.datamodule.on_after_batch_transfer(batch, 0)
        net = pl_module.net
        was_training = net.training
        net.eval()
        # The parameters' dtype, so that "16-true"/"bf16-true" precision works outside autocast.
        dtype = next(net.parameters()).dtype
        try:
            meta = batch.get("meta")
            output = net(
                batch["image"].to(pl_module.device, dtype),
                None if meta is None else meta.to(pl_module.device, dtype),
            )
        finally:
            net.train(was_training)
        normalization = pl_module.settings.normalization if self.normalization == "auto" else self.normalization
        images = [denormalize(img, normalization) for img in batch["image"].float().cpu()]
        ids = list(batch.get("id", [str(i) for i in indices]))
        labels = batch.get("label", torch.full((len(indices),), -1)).tolist()
        has_mask = batch.get("has_mask", torch.zeros(len(indices), dtype=torch.bool)).tolist()

        class_prob = output.class_logits.float().softmax(-1).cpu() if output.class_logits is not None else None
        mask_pred = None
        if output.mask_logits is not None:
            mask_pred = (output.mask_logits.float().sigmoid() > self.mask_threshold).cpu()
        panel = []
        for k, image in enumerate(images):
            caption = [ids[k]]
            if labels[k] >= 0 and labels[k] < len(class_names):
                caption.append(f"true {class_names[labels[k]]}")
            if class_prob is not None and class_names:
                prob, index = class_prob[k].max(0)
                caption.append(f"pred {class_names[int(index)]} {float(prob):.2f}")
            masks = {"prediction": mask_pred[k, 0]} if mask_pred is not None else {}
            if has_mask[k]:
                masks["ground_truth"] = (batch["mask"][k, 0] > 0.5).cpu()
            masks = {
                key: {"mask_data": m.numpy().astype(np.uint8), "class_labels": MASK_LABELS} for key, m in masks.items()
            }
            panel.append(wandb.Image(image, masks=masks or None, caption=", ".join(caption)))

        def heatmaps(maps: Any, captions: list[str]) -> list[Any]:
            return [
                wandb.Image(heatmap(image, maps[k], alpha=0.5), caption=captions[k]) for k, image in enumerate(images)
            ]

        entries: dict[str, list[Any]] = {"val/panel": panel}
        attention = output.attention or {}
        keys = self.attention_maps
        if keys is None:  # skip-level and classifier maps, and the deepest of the (many) encoder-block maps
            keys = [k for k in attention if not k.startswith("encoder.")]
            keys += [k for k in attention if k.startswith("encoder.")][-1:]
        for key in keys:
            if key in attention:
                entries[f"val/attention/{key}"] = heatmaps(attention[key][:, 0].float().cpu().numpy(), ids)
        if self.explain is not None and class_prob is not None:
            cams = self._gradcam(net, batch, dtype)
            if cams is not None:
                top = class_prob.argmax(1).tolist()
                entries["val/gradcam"] = heatmaps(cams, [f"{ids[k]}: {class_names[top[k]]}" for k in range(len(ids))])
        return entries

    def _gradcam(self, net: nn.Module, batch: dict[str, Any], dtype: torch.dtype) -> np.ndarray | None:
        """Grad-CAM maps of the panel images (top class), or ``None`` after a warning if it cannot be computed."""
        from skinfusion.inference.explain import explain

        meta = batch.get("meta")
        try:
            return explain(net, batch["image"].to(dtype), self.explain, meta=None if meta is None else meta.to(dtype))
        except Exception as error:  # an optional panel: say why once, go on training
            log.warning("WandbPanels: no %s panel (%s: %s); turned off", self.explain, type(error).__name__, error)
            self.explain = None
            return None

    @staticmethod
    def _confusion_chart(confmat: Tensor, class_names: list[str]) -> Any:
        import wandb

        counts = confmat.detach().cpu().long()
        cells = torch.arange(counts.numel()).repeat_interleave(counts.flatten())  # a cell index per sample
        y_true, preds = (cells // counts.shape[1]).tolist(), (cells % counts.shape[1]).tolist()
        return wandb.plot.confusion_matrix(
            y_true=y_true, preds=preds, class_names=class_names, title="Validation confusion matrix"
        )

    @staticmethod
    def _per_class_table(trainer: pl.Trainer, class_names: list[str], confmat: Tensor | None) -> Any | None:
        import wandb

        metrics = trainer.callback_metrics
        rows = []
        for index, name in enumerate(class_names):
            values = [metrics.get(f"val/{m}/{name}") for m in ("precision", "recall", "f1")]
            if all(v is None for v in values):
                continue
            support = int(confmat[index].sum()) if confmat is not None and index < confmat.shape[0] else None
            rows.append([name, *(None if v is None else float(v) for v in values), support])
        if not rows:
            return None
        return wandb.Table(columns=["class", "precision", "recall", "f1", "support"], data=rows)
