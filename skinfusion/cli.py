"""The ``skinfusion`` command line.

``skinfusion fit|validate|test|predict`` are LightningCLI subcommands configured from YAML
(``--config experiments/base.yaml --config experiments/quickstart.yaml``; the last wins);
``skinfusion prepare`` builds the resized cache and split manifest; ``skinfusion export``
writes ONNX / TorchScript / safetensors.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pytorch_lightning.cli import LightningArgumentParser, LightningCLI

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.module import SkinFusionModule

__all__ = ["SkinFusionCLI", "main"]

_EXTRA_COMMANDS = {
    "prepare": "validate data sources, write a resized cache and a split manifest",
    "export": "export a trained checkpoint to ONNX, TorchScript or safetensors",
}

_TOP_HELP = """usage: skinfusion [-h] {fit,validate,test,predict,prepare,export} ...

Joint lesion segmentation and diagnosis for dermoscopic images.

commands:
  fit        train a model (LightningCLI; --config FILE.yaml, --print_config to see every option)
  validate   run one evaluation epoch on the validation split
  test       run one evaluation epoch on the test split
  predict    predict masks and class probabilities
  prepare    validate data sources, write a resized cache and a split manifest
  export     export a trained checkpoint to ONNX, TorchScript or safetensors

`skinfusion COMMAND --help` describes each command.
"""


class SkinFusionCLI(LightningCLI):
    """LightningCLI with the data-to-model links skinfusion needs."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.num_classes", "model.net.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.meta_dim", "model.net.init_args.meta_dim", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``skinfusion`` console script (``args=None`` reads ``sys.argv``)."""
    argv = list(sys.argv[1:] if args is None else args)
    if not argv or argv[0] in ("-h", "--help"):
        print(_TOP_HELP)
        return
    if argv[0] == "prepare":
        from skinfusion.data.prepare import prepare_main

        prepare_main(argv[1:])
        return
    if argv[0] == "export":
        from skinfusion.export import export_main

        export_main(argv[1:])
        return
    SkinFusionCLI(
        SkinFusionModule,
        SkinFusionDataModule,
        args=argv,
        save_config_kwargs={"overwrite": True},
    )
