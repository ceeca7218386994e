"""The ``skinfusion`` command line: one name per job, one place that reports errors.

``fit``, ``validate`` and ``test`` are LightningCLI subcommands configured from YAML
(``--config experiments/base.yaml --config experiments/quickstart.yaml``; the last wins); ``predict`` writes
ISIC-format predictions for image files, ``evaluate`` scores them, ``prepare`` builds the resized cache and
split manifest, ``export`` writes ONNX / TorchScript / safetensors / a Hugging Face folder, ``study`` compares
variants, ``demo`` starts the web demo.

skinfusion's own errors (bad data, unloadable weights, refused configuration values) end any command with
one line saying what is wrong and what to do, and exit status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities.rank_zero import rank_zero_info

from skinfusion.allocator import tune_malloc
from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.errors import SkinFusionError, config_errors
from skinfusion.training.checkpointing import RNGStateCheckpoint
from skinfusion.training.module import SkinFusionModule

__all__ = ["SkinFusionCLI", "main"]

#: Commands that are not LightningCLI subcommands: name -> (module, function taking argv).
_COMMANDS = {
    "predict": ("skinfusion.inference.predictor", "predict_main"),
    "evaluate": ("skinfusion.evaluation.report", "evaluate_main"),
    "prepare": ("skinfusion.data.prepare", "prepare_main"),
    "export": ("skinfusion.inference.export", "export_main"),
    "study": ("skinfusion.evaluation.study", "study_main"),
    "crossval": ("skinfusion.evaluation.crossval", "crossval_main"),
    "demo": ("skinfusion.demo", "demo_main"),
}

_TOP_HELP = """usage: skinfusion [--debug] {fit,validate,test,predict,evaluate,crossval,prepare,export,study,demo} ...

Joint lesion segmentation and diagnosis for dermoscopic images.

commands:
  fit        train a model (LightningCLI; --config FILE.yaml, --print_config shows every option)
  validate   one evaluation epoch on the validation split (LightningCLI, training resolution)
  test       one evaluation epoch on the test split (LightningCLI, training resolution)
  predict    INPUT... --ckpt CKPT --out DIR: ISIC-format masks, class CSV, overlays, JSON at the
             original image size
  evaluate   --truth PATH --ckpt CKPT --out DIR: ISIC challenge metrics at the original
             resolution, per-class table, confusion matrix, ROC curves, worst segmentations
  crossval   --truth M --run FOLD_DIR... [--run ...] --out DIR: pool the folds of a k-fold
             cross-validation (every lesion scored once), both ways, seed-aware intervals
  prepare    validate data sources, write a resized cache and a split manifest
  export     export a trained checkpoint to ONNX, TorchScript, safetensors or a Hugging Face
             folder (config.json, model.safetensors, model card)
  study      train variants x seeds under one budget, score them on a held-out split, and compare
             them with paired bootstrap intervals (the paper's ablation; resumable)
  demo       [--ckpt CKPT] [--host H] [--port N]: a web demo (Gradio; pip install "skinfusion[demo]");
             without --ckpt, a toy model trained on synthetic lesions

`skinfusion COMMAND --help` describes each command; --debug shows tracebacks of skinfusion's errors.
"""


class SkinFusionCLI(LightningCLI):
    """LightningCLI with the data-to-model links skinfusion needs; every run checkpoints atomically and safely.

    Its ``trainer_defaults`` give every run :class:`~skinfusion.training.checkpointing.AtomicCheckpointIO` (unless
    the config names its own plugins) and :class:`~skinfusion.training.checkpointing.RNGStateCheckpoint`.
    ``predict`` is not a LightningCLI subcommand here: ``skinfusion predict`` is the file predictor.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault(
            "trainer_defaults",
            {
                "plugins": {"class_path": "skinfusion.training.checkpointing.AtomicCheckpointIO"},
                "callbacks": [RNGStateCheckpoint()],
            },
        )
        super().__init__(*args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k != "predict"}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.meta_dim", "model.net.init_args.meta_dim", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")

    def instantiate_classes(self) -> None:
        with config_errors():  # a value the classes refuse is the config's fault: one line, not a traceback
            super().instantiate_classes()

    def _parse_ckpt_path(self) -> None:
        # Private, and kept: no public hook replaces how LightningCLI reads --ckpt_path's hyperparameters (its
        # __init__ calls this right after parse_arguments). Its own version torch.loads the file (PyTorch's
        # traceback for a refused file) and copies every hyperparameter into the model config, the inference
        # record and loss config included, which the parser rejects. Read it safely and copy what is restored.
        if not self.config.get("subcommand"):
            return
        ckpt_path = self.config[self.config.subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        from skinfusion.io import load_checkpoint

        hparams = load_checkpoint(ckpt_path).get("hyper_parameters", {})
        restored = {k: v for k, v in hparams.items() if k in SkinFusionModule.restored_hparams}
        if restored:
            self.config = self.parser.parse_object({self.config.subcommand: {"model": restored}}, self.config)

    def before_fit(self) -> None:
        config = self.config_init[self.subcommand]
        if config.get("ckpt_path") == "last":
            # Lightning looks for last.ckpt only in this run's new version folder; look in earlier ones too.
            from skinfusion.training.checkpointing import find_last_checkpoint

            found = find_last_checkpoint(self.trainer)
            if found is not None:
                rank_zero_info(f"Resuming from {found}")
                config["ckpt_path"] = found


class _DropTips(logging.Filter):
    """Lightning's advertisements for its cloud products are not something a user of skinfusion can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def _quiet() -> None:
    """Silence what the user cannot act on: messages about how skinfusion calls its libraries."""
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within Python")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated")
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropTips())


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``skinfusion`` console script (``args=None`` reads ``sys.argv``)."""
    argv = list(sys.argv[1:] if args is None else args)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        print(_TOP_HELP)
        return
    command = argv[0]
    _quiet()
    tune_malloc()  # before any loader worker starts, so workers inherit it
    try:
        if command in _COMMANDS:
            module_name, function = _COMMANDS[command]
            getattr(importlib.import_module(module_name), function)(argv[1:])
        else:
            SkinFusionCLI(SkinFusionModule, SkinFusionDataModule, args=argv, save_config_kwargs={"overwrite": True})
    except SkinFusionError as err:
        if debug:
            raise
        print(f"skinfusion {command}: error: {err}", file=sys.stderr)
        if err.hint:
            print(f"  {err.hint} (--debug shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None
