"""The ``skinfusion`` command line.

``skinfusion fit|validate|test`` (and ``predict --config``) are LightningCLI subcommands configured from YAML
(``--config experiments/base.yaml --config experiments/quickstart.yaml``; the last wins);
``skinfusion prepare`` builds the resized cache and split manifest; ``predict``/``evaluate`` write
ISIC-format predictions and evaluation reports; ``skinfusion export``
writes ONNX / TorchScript / safetensors.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytorch_lightning import Callback, Trainer
from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.module import SkinFusionModule

__all__ = ["SkinFusionCLI", "main"]

#: Commands that are not LightningCLI subcommands: name -> (module, function taking argv).
_COMMANDS = {
    "prepare": ("skinfusion.data.prepare", "prepare_main"),
    "predict": ("skinfusion.predict", "predict_main"),
    "predict-images": ("skinfusion.predict", "predict_main"),
    "evaluate": ("skinfusion.report", "evaluate_main"),
    "export": ("skinfusion.export", "export_main"),
    "study": ("skinfusion.evaluation.study", "study_main"),
    "demo": ("skinfusion.demo", "demo_main"),
}
#: With one of these, `skinfusion predict` is LightningCLI's predict subcommand.
_LIGHTNING_FLAGS = ("--config", "-c", "--print_config", "--ckpt_path", "--trainer", "--model", "--data")

_TOP_HELP = """usage: skinfusion [-h] {fit,validate,test,predict,evaluate,prepare,export,study,demo} ...

Joint lesion segmentation and diagnosis for dermoscopic images.

commands:
  fit        train a model (LightningCLI; --config FILE.yaml, --print_config shows every option)
  validate   one evaluation epoch on the validation split (LightningCLI, training resolution)
  test       one evaluation epoch on the test split (LightningCLI, training resolution)
  predict    INPUT... --ckpt CKPT --out DIR: ISIC-format masks, class CSV, overlays, JSON at the
             original image size (with --config: LightningCLI's predict loop instead)
  evaluate   --truth PATH --ckpt CKPT --out DIR: ISIC challenge metrics at the original
             resolution, per-class table, confusion matrix, ROC curves, worst segmentations
  prepare    validate data sources, write a resized cache and a split manifest
  export     export a trained checkpoint to ONNX, TorchScript or safetensors
  study      train variants x seeds under one budget, score them on a held-out split, and compare
             them with paired bootstrap intervals (the paper's ablation; resumable)
  demo       [--ckpt CKPT] [--host H] [--port N]: a web demo (Gradio; pip install "skinfusion[demo]");
             without --ckpt, a toy model trained on synthetic lesions

`skinfusion COMMAND --help` describes each command.
"""


class SkinFusionCLI(LightningCLI):
    """LightningCLI with the data-to-model links skinfusion needs."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.meta_dim", "model.net.init_args.meta_dim", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # Every run gets atomic, safely loaded checkpoints and RNG states in them (exact resume),
        # unless the config already chose a CheckpointIO plugin / the callback itself.
        from skinfusion.reliability import AtomicCheckpointIO, RNGStateCheckpoint

        plugins = config.get("plugins")
        plugins = [] if plugins is None else list(plugins) if isinstance(plugins, list | tuple) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        config["plugins"] = plugins
        configured = config.get("callbacks") or []
        configured = [*(configured if isinstance(configured, list) else [configured]), *callbacks]
        if not any(isinstance(c, RNGStateCheckpoint) for c in configured):
            callbacks = [*callbacks, RNGStateCheckpoint()]
        return super()._instantiate_trainer(config, callbacks)

    def _parse_ckpt_path(self) -> None:
        # LightningCLI copies a checkpoint's hyperparameters into the model config. Read the file safely
        # (a clear WeightsError for a pickle that would run code) and copy only the module's own plain
        # arguments: net_config/loss_config/classes are records for from_checkpoint, not CLI options.
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        from skinfusion.io import load_checkpoint
        from skinfusion.module import _PLAIN_HPARAMS

        hparams = load_checkpoint(ckpt_path).get("hyper_parameters", {})
        plain = {k: v for k, v in hparams.items() if k in _PLAIN_HPARAMS}
        if plain:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": plain}}, self.config)

    def _safe_loading(self) -> None:
        """Load checkpoints with ``weights_only=True`` unless the command line says ``--weights_only false``."""
        config = self.config_init[self.subcommand]
        if config.get("weights_only") is None:
            config["weights_only"] = True

    def before_fit(self) -> None:
        self._safe_loading()
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            # Lightning looks for last.ckpt only in this run's new version folder; look in earlier ones too.
            from skinfusion.reliability import find_last_checkpoint

            found = find_last_checkpoint(self.trainer)
            if found is not None:
                rank_zero_info(f"Resuming from {found}")
                config["ckpt_path"] = found

    def before_validate(self) -> None:
        self._safe_loading()

    def before_test(self) -> None:
        self._safe_loading()

    def before_predict(self) -> None:
        self._safe_loading()


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``skinfusion`` console script (``args=None`` reads ``sys.argv``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_TOP_HELP)
        return
    command, rest = argv[0], argv[1:]
    lightning_predict = command == "predict" and any(a.split("=")[0] in _LIGHTNING_FLAGS for a in rest)
    if command in _COMMANDS and not lightning_predict:
        module_name, function = _COMMANDS[command]
        status = getattr(importlib.import_module(module_name), function)(rest)
        if isinstance(status, int) and not isinstance(status, bool) and status != 0:
            raise SystemExit(status)  # prepare returns 1 for bad data; the others return their results
        return
    SkinFusionCLI(
        SkinFusionModule,
        SkinFusionDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
