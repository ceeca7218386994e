"""SkinFusionModule: the LightningModule that trains a :class:`~skinfusion.nn.SkinFusionNet`.

The network is a plain ``nn.Module`` handed in from outside (exportable and testable without a Trainer);
this module owns the loss, the metrics, the optimiser and the logging.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Timer
from pytorch_lightning.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.data.dataset import encode_metadata, unknown_metadata
from skinfusion.data.records import ISIC_CLASSES, Record
from skinfusion.errors import DataError, SkinFusionError
from skinfusion.evaluation.metrics import classification_metrics, flatten_metrics, segmentation_metrics
from skinfusion.io import InferenceSettings, load_checkpoint
from skinfusion.nn import SkinFusionNet
from skinfusion.nn.output import SkinFusionOutput
from skinfusion.training.losses import MultiTaskLoss
from skinfusion.training.schedule import WarmupCosine

log = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "SkinFusionModule", "fit_late_fusion"]

STAGES = ("train", "val", "test")


def _metric_state(metric: nn.Module) -> dict[str, Any]:
    """A torchmetrics metric's accumulated states (tensors or lists of tensors, on the CPU) and update count."""
    state: dict[str, Any] = {"_update_count": metric._update_count}
    for name, value in metric.metric_state.items():
        state[name] = [v.detach().cpu() for v in value] if isinstance(value, list) else value.detach().cpu()
    return state


class NonFiniteLossError(SkinFusionError, FloatingPointError):
    """The training loss became NaN or Inf (the message says what to try)."""


_FUSED_DEVICES = ("cpu", "cuda")


def _default_optimizer(params, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW(lr=1e-3, weight_decay=1e-4), fused (one kernel for all parameters, much faster on a CPU) if possible.

    ``fused=None`` picks it when every parameter is a float tensor on CPU or CUDA.
    """
    params = [dict(g, params=list(g["params"])) if isinstance(g, dict) else g for g in params]
    if fused is None:
        tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
        fused = bool(tensors) and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in tensors)
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, fused=fused or None)


class SkinFusionModule(pl.LightningModule):
    """Trains segmentation and classification together on the DataModule's batches.

    A batch holds ``image`` (B,3,H,W) float, ``mask`` (B,1,H,W) in {0,1}, ``has_mask`` (B,) bool, ``label`` (B,)
    int64 with -1 where unknown, ``id`` and optionally ``meta`` (B,M); the losses and metrics count only the
    samples that have a mask or a label.

    Args:
        loss: the multi-task loss; default Dice+BCE plus cross-entropy, weights 1.
        optimizer: a callable ``params -> Optimizer`` (LightningCLI builds it from YAML); default
            :func:`_default_optimizer`.
        scheduler: a callable ``optimizer -> LRScheduler`` or ``None``.
        class_names: names of the classes in label-index order (linked from the DataModule).
        encoder_lr_mult: the encoder's learning rate is the optimiser's times this.
        freeze_encoder_epochs: keep the encoder frozen (weights and BatchNorm statistics) for this many epochs.
        mask_threshold: probability above which a pixel counts as lesion in the metrics.
        nonfinite_loss: ``"raise"`` stops training with :class:`NonFiniteLossError` when the loss is NaN/Inf
            (the last checkpoint stays as it was); ``"skip"`` skips that optimisation step and logs a warning.
        scheduler_interval: ``"epoch"`` or ``"step"``: when the scheduler steps.
        scheduler_monitor: metric for schedulers such as ReduceLROnPlateau.
        channels_last: keep the network's weights and inputs in NHWC memory format (often faster convolutions;
            results equal the NCHW ones up to float rounding).
        compile: ``torch.compile`` the network's forward (``True``, or a dict of ``torch.compile`` arguments),
            via ``nn.Module.compile`` so that parameter names and checkpoints stay the same.
        train_metrics: compute the metrics of the training batches too (the losses are logged either way).
    """

    def __init__(
        self,
        net: SkinFusionNet,
        loss: MultiTaskLoss | None = None,
        optimizer: OptimizerCallable = _default_optimizer,
        scheduler: LRSchedulerCallable | None = None,
        class_names: list[str] | None = None,
        encoder_lr_mult: float = 1.0,
        freeze_encoder_epochs: int = 0,
        mask_threshold: float = 0.5,
        nonfinite_loss: Literal["raise", "skip"] = "raise",
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/loss",
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        train_metrics: bool = True,
    ) -> None:
        super().__init__()
        if encoder_lr_mult < 0:
            raise ValueError(f"encoder_lr_mult must be >= 0, got {encoder_lr_mult}")
        if freeze_encoder_epochs < 0:
            raise ValueError(f"freeze_encoder_epochs must be >= 0, got {freeze_encoder_epochs}")
        if not isinstance(compile, bool | dict):
            raise ValueError(f"compile must be a bool or a dict of torch.compile arguments, got {compile!r}")
        if nonfinite_loss not in ("raise", "skip"):
            raise ValueError(f"nonfinite_loss must be 'raise' or 'skip', got {nonfinite_loss!r}")
        # class_names is stored in the inference record: the DataModule has its own (possibly unset) class_names.
        self.save_hyperparameters(ignore=["net", "loss", "optimizer", "scheduler", "class_names"])
        self.net = net
        self.loss = loss if loss is not None else MultiTaskLoss()
        self.optimizer = optimizer
        self.scheduler = scheduler
        num_classes = net.num_classes
        self.class_names = list(class_names) if class_names else list(ISIC_CLASSES[:num_classes])
        if net.has_classifier and len(self.class_names) != num_classes:
            raise ValueError(f"{len(self.class_names)} class names given for a {num_classes}-class network")
        # Plain values, so a checkpoint rebuilds the network and loss without unpickling objects; saved through
        # save_hyperparameters so that loggers record them too. setup() adds the DataModule's input settings.
        inference = InferenceSettings(dict(getattr(net, "config", {})), self.class_names).to_dict()  # any network
        self.save_hyperparameters({"inference": inference, "loss_config": dict(self.loss.config)})
        self.has_classifier = net.has_classifier
        self.has_decoder = net.has_decoder
        self.last_confmat: dict[str, Tensor] = {}  # the latest confusion matrix of each stage (for W&B panels)
        # One collection per stage, never shared; keys get a "_" so "train" does not shadow nn.Module.train.
        self.cls_metrics = nn.ModuleDict(
            {f"{s}_": classification_metrics(num_classes) for s in STAGES} if self.has_classifier else {}
        )
        self.seg_metrics = nn.ModuleDict(
            {f"{s}_": segmentation_metrics(mask_threshold) for s in STAGES} if self.has_decoder else {}
        )
        # With a metadata branch, validation and test also score the diagnosis with the metadata withheld
        # ({stage}/image_only/...): what `predict DIR`, the demo and any image without age/sex/site get.
        self.image_only_metrics = nn.ModuleDict(
            {f"{s}_": classification_metrics(num_classes) for s in ("val", "test")}
            if self.has_classifier and getattr(net, "meta_dim", 0)
            else {}
        )
        self._seen = dict.fromkeys(STAGES, (0, 0))
        self._train_sums: dict[str, Tensor] = {}  # loss name -> sum of batch mean x batch size, this epoch
        self._train_weight = 0.0
        self._pending_epoch_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ forward
    def forward(self, image: Tensor, meta: Tensor | None = None) -> SkinFusionOutput:
        if self.hparams.get("channels_last"):
            image = image.contiguous(memory_format=torch.channels_last)
        return self.net(image, meta)

    def configure_model(self) -> None:
        """Apply the speed options (``channels_last``, ``compile``); called by the Trainer, idempotent."""
        if self.hparams.get("channels_last"):
            self.net.to(memory_format=torch.channels_last)
        options = self.hparams.get("compile")
        if options and getattr(self.net, "_compiled_call_impl", None) is None:
            self.net.compile(**(options if isinstance(options, dict) else {}))

    # ------------------------------------------------------------------ steps
    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor | None:
        output = self(batch["image"], batch.get("meta"))
        losses = self.loss(output, batch)
        loss = losses["loss"]
        # A float, so that Lightning's sum of batch sizes stays exact when synced over processes: with gloo,
        # its "mean" all-reduce divides an integer tensor in place and truncates (epoch losses off under DDP).
        batch_size = float(batch["image"].shape[0])
        if stage == "train" and not torch.isfinite(loss):
            msg = (
                f"non-finite training loss ({loss.item()}) at epoch {self.current_epoch}, step {self.global_step}"
                f" (batch ids {list(batch.get('id', []))[:8]}). Lower the learning rate or enable gradient clipping;"
                " set model.nonfinite_loss=skip to skip such steps."
            )
            if self.hparams.nonfinite_loss == "raise":
                raise NonFiniteLossError(msg)
            log.warning("skipping step: %s", msg)
            return None
        scalars = {key: value.detach() for key, value in losses.items() if value.ndim == 0}
        if stage == "train":
            # Per step here; the epoch means are this module's sums (not Lightning's, which a checkpoint does not
            # keep), so that a fit resumed mid-epoch logs the same train/*_epoch values as an uninterrupted one.
            for key, value in scalars.items():
                self.log(f"train/{key}_step", value, on_step=True, on_epoch=False, prog_bar=key == "loss")
                self.log(f"train/{key}", value, on_step=True, on_epoch=False, logger=False)  # for monitors
                self._train_sums[key] = self._train_sums.get(key, 0.0) + value.double() * batch_size
            self._train_weight += batch_size
        else:
            for key, value in scalars.items():
                self.log(f"{stage}/{key}", value, prog_bar=key == "loss", batch_size=batch_size, sync_dist=True)
        if stage != "train" or self.hparams.get("train_metrics", True):
            self._update_metrics(output, batch, stage)
        return loss

    @torch.no_grad()
    def _update_metrics(self, output: SkinFusionOutput, batch: dict[str, Any], stage: str) -> None:
        n_seg, n_cls = self._seen[stage]
        if output.mask_logits is not None and self.has_decoder:
            has_mask = batch["has_mask"]
            if has_mask.any():
                self.seg_metrics[f"{stage}_"].update(output.mask_logits[has_mask], batch["mask"][has_mask])
                n_seg += int(has_mask.sum())
        if output.class_logits is not None and self.has_classifier:
            labelled = batch["label"] >= 0
            if labelled.any():
                self.cls_metrics[f"{stage}_"].update(output.class_logits.float().softmax(-1), batch["label"])
                n_cls += int(labelled.sum())
                if f"{stage}_" in self.image_only_metrics and batch.get("meta") is not None:
                    late_fusion = getattr(self.net, "late_fusion", None)
                    if late_fusion is not None:  # the image network's own logits: no second forward pass
                        logits = output.class_logits - late_fusion(batch["meta"])
                    else:
                        logits = self(batch["image"], unknown_metadata(batch["meta"])).class_logits
                    self.image_only_metrics[f"{stage}_"].update(logits.float().softmax(-1), batch["label"])
        self._seen[stage] = (n_seg, n_cls)

    def _log_epoch_metrics(self, stage: str) -> None:
        n_seg, n_cls = self._seen[stage]
        # Counts are per process; the metric states themselves are all-reduced by torchmetrics.
        seen = torch.tensor([n_seg, n_cls], device=self.device)
        if self.trainer is not None and self.trainer.world_size > 1:
            seen = self.all_gather(seen).sum(0)
        values: dict[str, Tensor] = {}
        if self.has_decoder:
            if seen[0] > 0:
                values.update(flatten_metrics(self.seg_metrics[f"{stage}_"].compute(), self.class_names, stage))
            self.seg_metrics[f"{stage}_"].reset()
        if self.has_classifier:
            if seen[1] > 0:
                with warnings.catch_warnings():  # a class absent from a (sanity-check) epoch is no user error
                    warnings.filterwarnings("ignore", message="No positive samples in targets")
                    computed = self.cls_metrics[f"{stage}_"].compute()
                self.last_confmat[stage] = computed["confmat"].cpu()
                values.update(flatten_metrics(computed, self.class_names, stage))
            self.cls_metrics[f"{stage}_"].reset()
            image_only = self.image_only_metrics[f"{stage}_"] if f"{stage}_" in self.image_only_metrics else {}  # noqa: SIM401 (ModuleDict has no get)
            if any(m.update_called for m in image_only.values()):
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="No positive samples in targets")
                    values.update(flatten_metrics(image_only.compute(), self.class_names, f"{stage}/image_only"))
                image_only.reset()
        self._seen[stage] = (0, 0)
        if values:
            self.log_dict({k: v.float() for k, v in values.items()}, prog_bar=False, sync_dist=False)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def on_train_epoch_end(self) -> None:
        # Per process, as the step values (the metrics below are all-reduced by torchmetrics).
        for key, total in self._train_sums.items():
            mean = (total / self._train_weight).float()
            self.log(f"train/{key}_epoch", mean, prog_bar=key == "loss")
            self.log(f"train/{key}", mean, logger=False)
        self._train_sums, self._train_weight = {}, 0.0
        self._log_epoch_metrics("train")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_metrics("test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        output = self(batch["image"], batch.get("meta"))
        result: dict[str, Any] = {"id": batch.get("id")}
        if output.mask_logits is not None:
            result["mask_prob"] = output.mask_logits.float().sigmoid()
        if output.class_logits is not None:
            result["class_prob"] = output.class_logits.float().softmax(-1)
        result["attention"] = {k: v.float() for k, v in output.attention.items()}
        return result

    @property
    def settings(self) -> InferenceSettings:
        """The inference record this module's checkpoints carry (network, classes, input size and normalisation)."""
        return InferenceSettings(**self.hparams["inference"])

    def setup(self, stage: str) -> None:
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, SkinFusionDataModule):
            self.hparams["inference"].update(image_size=datamodule.image_size, normalization=datamodule.normalization)
        if self.loss.auto_class_weights or self.loss.auto_class_priors:
            if not isinstance(datamodule, SkinFusionDataModule):
                raise ValueError(
                    "loss class_weights='auto' and logit_adjustment with class_priors='auto' read the training"
                    " split's class counts from a SkinFusionDataModule; pass the values instead"
                )
            # What the loss sees: the training labels as the sampler draws them (balanced sampling included).
            counts = datamodule.class_frequencies
            self.loss.set_class_counts(counts)
            self.hparams["loss_config"] = dict(self.loss.config)
            log.info(
                "training class counts %s -> loss %s",
                counts,
                {k: v for k, v in self.loss.config.items() if k in ("class_weights", "class_priors")},
            )

    # ------------------------------------------------------------------ encoder freezing
    def on_train_epoch_start(self) -> None:
        self.net.freeze_encoder(self.current_epoch < self.hparams.freeze_encoder_epochs)

    # ------------------------------------------------------------------ optimisers
    def configure_optimizers(self) -> Any:
        encoder_params = list(self.net.encoder_parameters())
        encoder_ids = {id(p) for p in encoder_params}
        other_params = [p for p in self.parameters() if id(p) not in encoder_ids]
        groups = [
            g
            for g in ({"params": encoder_params, "name": "encoder"}, {"params": other_params, "name": "head"})
            if g["params"]
        ]
        fp16_clipping = self._fp16_clipping()
        if self.optimizer is _default_optimizer:
            optimizer = _default_optimizer(groups, fused=False if fp16_clipping else None)
        else:
            optimizer = self.optimizer(groups)
        if fp16_clipping and getattr(optimizer, "_step_supports_amp_scaling", False):
            # A fused optimiser unscales inside its step, so Lightning cannot clip fp16 gradients before it
            # (it would fail at the first step): say so now.
            raise ValueError(
                f"{type(optimizer).__name__}(fused=True) cannot be combined with trainer.precision="
                f"{self.trainer.precision!r} and gradient clipping (gradient_clip_val="
                f"{self.trainer.gradient_clip_val}): set the optimizer's fused: false, use bf16-mixed, "
                "or drop the clipping"
            )
        for group in optimizer.param_groups:
            if group.get("name") == "encoder":
                group["lr"] = group["lr"] * self.hparams.encoder_lr_mult
        if self.scheduler is None:
            return optimizer
        scheduler = self.scheduler(optimizer)
        interval = self.hparams.scheduler_interval
        if isinstance(scheduler, WarmupCosine):
            # It follows the run's progress step by step; its length is bound in on_train_start, not here:
            # reading trainer.estimated_stepping_batches now would build the training loader before Lightning
            # restores a checkpoint's loops, and a resumed fit would then replay the epoch from its start.
            interval = "step"
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval, "monitor": self.hparams.scheduler_monitor},
        }

    # ------------------------------------------------------------------ the epoch so far, in checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A mid-epoch checkpoint (LastCheckpoint every n steps) carries what the epoch's training metrics have
        # accumulated; one written at an epoch's end carries empty sums.
        if self._trainer is None or self.trainer.world_size > 1:
            return
        checkpoint["train_epoch_state"] = {
            "epoch": self.current_epoch,
            "loss_sums": {k: v.cpu() for k, v in self._train_sums.items()},
            "weight": self._train_weight,
            "seen": list(self._seen["train"]),
            "metrics": {
                f"{group}.{name}": _metric_state(metric)
                for group, collections in (("cls", self.cls_metrics), ("seg", self.seg_metrics))
                if "train_" in collections
                for name, metric in collections["train_"].items(keep_base=True, copy_state=False)
            },
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._pending_epoch_state = checkpoint.get("train_epoch_state")

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self._pending_epoch_state is not None:
            self._restore_epoch_state(self._pending_epoch_state)
            self._pending_epoch_state = None

    def _restore_epoch_state(self, state: dict[str, Any]) -> None:
        if state["epoch"] != self.current_epoch or self.trainer.world_size > 1:
            # The checkpoint's epoch is over (Lightning resumes at the next one), or each process would add the
            # single-process sums again.
            return
        self._train_sums = {k: v.to(self.device) for k, v in state["loss_sums"].items()}
        self._train_weight = float(state["weight"])
        self._seen["train"] = tuple(state["seen"])
        for key, saved in state["metrics"].items():
            group, name = key.split(".", 1)
            metric = (self.cls_metrics if group == "cls" else self.seg_metrics)["train_"][name]
            for attr, value in saved.items():
                if attr == "_update_count":
                    metric._update_count = int(value)
                elif isinstance(value, list):
                    setattr(metric, attr, [v.to(self.device) for v in value])
                else:
                    setattr(metric, attr, value.to(self.device))

    def on_fit_start(self) -> None:
        late_fusion = getattr(self.net, "late_fusion", None)
        if late_fusion is not None:
            self._fit_late_fusion(late_fusion)

    def _fit_late_fusion(self, late_fusion: nn.Module) -> None:
        """Fit the metadata model of ``meta_fusion="late"`` on the training split (every fit, resumed or not: it
        depends only on those records, so a resumed run gets the same one)."""
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, SkinFusionDataModule):
            raise ValueError("meta_fusion='late' fits its metadata model on a SkinFusionDataModule's training split")
        known, total = fit_late_fusion(late_fusion, datamodule.records("train"), self.class_names, datamodule.manifest)
        late_fusion.to(self.device)
        log.info(
            "late fusion: metadata model fitted on %d training images with metadata (of %d labelled)", known, total
        )

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1 and self.trainer.ckpt_path:
            log.info("multi-process run: the resumed epoch's train/* metrics cover the steps since the resume")
        # After the checkpoint (if any) is restored and the training loader is built: the run's length is known.
        for config in self.trainer.lr_scheduler_configs:
            if isinstance(config.scheduler, WarmupCosine):
                config.scheduler.bind(self.trainer.estimated_stepping_batches, self._time_fraction())

    def _time_fraction(self) -> Callable[[], float] | None:
        """A clock of the fraction of ``trainer.max_time`` spent training, or ``None`` without ``max_time``."""
        timer = next((c for c in self.trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None or timer.time_remaining() is None:
            return None

        def fraction() -> float:
            elapsed = timer.time_elapsed("train")
            return elapsed / max(elapsed + timer.time_remaining("train"), 1e-9)

        return fraction

    def _fp16_clipping(self) -> bool:
        """Whether the Trainer scales fp16 gradients (a GradScaler) and also clips them."""
        trainer = self._trainer
        if trainer is None:
            return False
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return scaler is not None and bool(trainer.gradient_clip_val)

    # ------------------------------------------------------------------ loading
    #: Arguments a checkpoint restores (``from_checkpoint``, and the command line's ``--ckpt_path``); the speed
    #: options (``channels_last``, ``compile``, ``train_metrics``) belong to the run, not to the model.
    restored_hparams: tuple[str, ...] = (
        "encoder_lr_mult",
        "freeze_encoder_epochs",
        "mask_threshold",
        "nonfinite_loss",
        "scheduler_interval",
        "scheduler_monitor",
    )

    @classmethod
    def from_checkpoint(
        cls, path: str | Path | Mapping[str, Any], map_location: str | torch.device = "cpu"
    ) -> SkinFusionModule:
        """Rebuild a trained module from a skinfusion checkpoint (a path, or one already read) without unpickling.

        The network and loss are rebuilt from the plain records in its hyperparameters; the weights load strictly.
        """
        ckpt = path if isinstance(path, Mapping) else load_checkpoint(path, map_location)
        settings = InferenceSettings.from_checkpoint(ckpt)
        hparams = ckpt.get("hyper_parameters") or {}
        module = cls(
            net=SkinFusionNet(**settings.net_config),
            loss=MultiTaskLoss(**hparams.get("loss_config", {})),
            class_names=list(settings.class_names) or None,
            **{k: v for k, v in hparams.items() if k in cls.restored_hparams},
        )
        module.hparams["inference"] = settings.to_dict()
        module.load_state_dict(ckpt["state_dict"])  # copies into the new module's CPU parameters...
        return module.to(map_location)  # ...so it goes where the caller asked


def fit_late_fusion(
    late_fusion: nn.Module, records: Sequence[Record], class_names: Sequence[str], source: str | Path | None = None
) -> tuple[int, int]:
    """Fit ``late_fusion`` (:class:`~skinfusion.nn.late_fusion.MetadataLateFusion`) on the labelled ``records`` of
    ``class_names`` that have age, sex or site; returns (images with metadata, labelled images).

    Raises:
        DataError: no labelled record has metadata (``source`` names the data).
    """
    records = [r for r in records if r.label in class_names]
    meta = torch.from_numpy(np.stack([encode_metadata(r.meta) for r in records])) if records else None
    known = int(late_fusion.known(meta).sum()) if meta is not None else 0
    if not known:
        raise DataError(
            source,
            f"meta_fusion='late' needs training images with age, sex or site; none of the {len(records)} labelled"
            " training images has any (train without metadata: data.use_metadata=false)",
        )
    labels = torch.tensor([list(class_names).index(r.label) for r in records])
    late_fusion.fit(meta, labels)
    return known, len(records)
