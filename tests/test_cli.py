"""The command line: every experiment config runs, links reach the model, help works."""

from __future__ import annotations

from pathlib import Path

import pytest

from skinfusion.cli import main
from skinfusion.data.synthetic import write_synthetic
from skinfusion.errors import DataError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").rglob("*.yaml"))
BASE = REPO / "experiments" / "base.yaml"

TINY = [
    "--model.net.init_args.encoder=test_resnet",
    "--model.net.init_args.pretrained=false",
    "--model.net.init_args.decoder_channels=[16,16,8,8,8]",
    "--trainer.accelerator=cpu",
    "--trainer.fast_dev_run=true",
    "--data.image_size=64",
    "--data.batch_size=4",
    "--data.num_workers=0",
]


@pytest.fixture
def small_manifest(tmp_path) -> Path:
    """A small prepared manifest (synthetic lesions) standing in for the ISIC 2018 cache."""
    write_synthetic(tmp_path / "synthetic", n=40, seed=1, size=64)
    return tmp_path / "synthetic" / "manifest.csv"


PAPER = REPO / "experiments" / "paper"
SWITCHES = ("baseline", "attention", "fusion", "full")


def _configs_for(path: Path) -> list[str]:
    """The configs a README command puts before and with ``path``."""
    configs = ["--config", str(BASE)]
    if path.parent == PAPER and path.name != "paper.yaml":
        configs += ["--config", str(PAPER / "paper.yaml")]
        if path.stem not in SWITCHES:  # cpu.yaml, three_class.yaml: added after a switch file
            configs += ["--config", str(PAPER / "full.yaml")]
    if path != BASE:
        configs += ["--config", str(path)]
    return configs


def test_every_experiment_is_tested():
    names = {str(p.relative_to(REPO / "experiments")) for p in EXPERIMENTS}
    assert {
        "base.yaml",
        "quickstart.yaml",
        "paper/baseline.yaml",
        "paper/attention.yaml",
        "paper/fusion.yaml",
        "paper/full.yaml",
        "paper/cpu.yaml",
        "paper/paper.yaml",
        "paper/three_class.yaml",
    } <= names


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: str(p.relative_to(REPO / "experiments")))
def test_experiment_fast_dev_run(config, small_manifest, capsys):
    main(["fit", *_configs_for(config), *TINY, f"--data.manifest={small_manifest}"])
    out = capsys.readouterr().out
    assert "Final validation metrics" in out


def test_paper_configs_are_a_common_file_plus_switches():
    import yaml

    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = v
        return out

    switches = {
        "model.net.init_args.attention",
        "model.net.init_args.attention_placement",
        "model.net.init_args.decoder",
        "model.net.init_args.fusion",
    }
    configs = {name: flat(yaml.safe_load((PAPER / f"{name}.yaml").read_text())) for name in SWITCHES}
    for name, config in configs.items():
        assert set(config) == switches, f"{name}.yaml holds more than the switches: {set(config) - switches}"
    assert not switches & set(flat(yaml.safe_load((PAPER / "paper.yaml").read_text())))
    assert configs["baseline"]["model.net.init_args.decoder"] is False
    assert configs["baseline"]["model.net.init_args.attention"] is None
    assert configs["attention"]["model.net.init_args.attention"] == "spatial"
    assert configs["attention"]["model.net.init_args.decoder"] is False
    assert configs["fusion"]["model.net.init_args.decoder"] is True
    assert configs["fusion"]["model.net.init_args.attention"] is None
    assert configs["full"]["model.net.init_args.attention"] == "spatial"
    assert configs["full"]["model.net.init_args.decoder"] is True


def test_links_data_to_model(small_manifest, tmp_path):
    """num_classes / class_names come from the DataModule (here a 3-class label map)."""
    from skinfusion.cli import SkinFusionCLI
    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.training.module import SkinFusionModule

    cli = SkinFusionCLI(
        SkinFusionModule,
        SkinFusionDataModule,
        run=False,
        args=[
            *_configs_for(BASE),
            *[a for a in TINY if "fast_dev_run" not in a],
            f"--data.manifest={small_manifest}",
            "--data.class_names=[MEL,NV,SCC]",
            "--data.label_map={MEL: MEL, NV: NV, BCC: SCC, AKIEC: SCC, BKL: NV, DF: NV, VASC: NV}",
        ],
    )
    assert cli.model.net.num_classes == 3
    assert cli.model.class_names == ["MEL", "NV", "SCC"]


def test_top_level_help(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", "prepare", "export"):
        assert command in out


def test_missing_manifest_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_configs_for(BASE), *TINY, f"--data.manifest={tmp_path / 'nope.csv'}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "nope.csv: manifest not found" in err
    assert "Traceback" not in err
    with pytest.raises(DataError, match="nope.csv"):  # --debug: the error itself, with its traceback
        main(["--debug", "fit", *_configs_for(BASE), *TINY, f"--data.manifest={tmp_path / 'nope.csv'}"])


def test_a_value_the_classes_refuse_is_a_config_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *_configs_for(BASE), *TINY, "--model.net.init_args.decoder=false"])  # mask_pool needs it
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "needs the decoder" in err
    assert "--help" in err
    assert "Traceback" not in err


def test_test_command_reports_isic_metrics_at_original_resolution(small_manifest, tmp_path, capsys):
    """`skinfusion test` ends with the official-resolution ISIC metrics and the report folder."""
    import json

    # CSV logging only: a second W&B run in one pytest process would disturb tests/test_wandb.py's own run.
    csv_only = (
        '--trainer.logger={"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}'
    )
    common = [
        *_configs_for(BASE),
        *[a for a in TINY if "fast_dev_run" not in a],
        f"--data.manifest={small_manifest}",
        csv_only,
    ]
    main(["fit", *common, "--trainer.max_steps=2", "--trainer.limit_val_batches=1"])
    last = next(tmp_path.rglob("last.ckpt"))
    main(["test", *common, f"--ckpt_path={last}"])
    printed = capsys.readouterr().out
    out_dir = next(tmp_path.rglob("test_report"))
    assert "ISIC metrics at the original resolution" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())
    n_test = sum(1 for line in small_manifest.read_text().splitlines()[1:] if ",test," in line)
    assert metrics["task1/num_images"] == n_test
    assert 0.0 <= metrics["task1/threshold_jaccard"] <= 1.0
    assert (out_dir / "per_class.md").is_file()
    assert (out_dir / "worst_segmentations").is_dir()
