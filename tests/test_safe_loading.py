"""Checkpoints and weight files never unpickle arbitrary objects: a code-running pickle is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from modelutil import TINY_CLI

from skinfusion.errors import WeightsError
from skinfusion.training.checkpointing import AtomicCheckpointIO
from skinfusion.training.module import SkinFusionModule

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "base.yaml"


class _Payload:
    """Unpickling this calls ``os.system`` (it would create the marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def malicious(tmp_path, tiny_net) -> tuple[Path, Path]:
    """A Lightning-looking checkpoint with a code-running object inside, and the file it would create."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    net = tiny_net()
    torch.save(
        {
            "state_dict": {f"net.{k}": v for k, v in net.state_dict().items()},
            "hyper_parameters": {"net_config": dict(net.config)},
            "global_step": 1,
            "payload": _Payload(marker),
        },
        path,
    )
    # Sanity check of the fixture itself: unrestricted unpickling would indeed run the code.
    torch.load(path, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_from_checkpoint_refuses_code(malicious):
    path, marker = malicious
    with pytest.raises(WeightsError, match="refused to load"):
        SkinFusionModule.from_checkpoint(str(path))
    assert not marker.exists()


def test_pretrained_file_refuses_code(malicious, tiny_net):
    path, marker = malicious
    with pytest.raises(WeightsError, match="refused to load"):
        tiny_net(pretrained=str(path))
    assert not marker.exists()


def test_checkpoint_io_refuses_code(malicious):
    path, marker = malicious
    with pytest.raises(WeightsError, match="evil.ckpt"):
        AtomicCheckpointIO().load_checkpoint(path)
    with pytest.raises(WeightsError):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=True)
    assert not marker.exists()


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_cli_resume_and_evaluation_refuse_code(malicious, command, capsys):
    from skinfusion.cli import main

    path, marker = malicious
    with pytest.raises(SystemExit) as exit_info:
        main(
            [
                command,
                *TINY_CLI,
                "--trainer.logger=false",
                "--trainer.max_epochs=1",
                "--data.synthetic_samples=20",
                "--data.synthetic_size=32",
                "--data.image_size=32",
                "--data.num_workers=0",
                f"--ckpt_path={path}",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("refused to load") == 1  # one clear message: no traceback, no PyTorch essay
    assert "posix.system" in err
    assert "Traceback" not in err
    assert "file an issue" not in err.lower()
    assert not marker.exists()


def test_trainer_resume_path_refuses_code(malicious, tiny_net):
    """Lightning's own resume path (Trainer.fit(ckpt_path=...)) goes through the plugin."""
    import pytorch_lightning as pl

    from skinfusion.data.datamodule import SkinFusionDataModule

    path, marker = malicious
    module = SkinFusionModule(tiny_net())
    data = SkinFusionDataModule(synthetic_samples=20, synthetic_size=32, image_size=32, num_workers=0)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, plugins=[AtomicCheckpointIO()]
    )
    with pytest.raises(WeightsError):
        trainer.fit(module, data, ckpt_path=str(path))
    assert not marker.exists()


def test_safe_checkpoints_still_load(tmp_path, tiny_net):
    net = tiny_net()
    path = tmp_path / "ok.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": net.state_dict(), "epoch": 3}, path)
    loaded = AtomicCheckpointIO().load_checkpoint(path)
    assert loaded["epoch"] == 3
    assert all(torch.equal(loaded["state_dict"][k], v) for k, v in net.state_dict().items())


def test_exported_weights_are_safetensors(tmp_path, tiny_net):
    from safetensors import safe_open

    from skinfusion.inference.export import export_safetensors

    net = tiny_net()
    path = tmp_path / "model.safetensors"
    export_safetensors(net, path)
    with safe_open(str(path), "pt") as f:  # raises on anything that is not safetensors
        keys = set(f.keys())
    assert keys
    assert keys <= {*net.state_dict().keys(), *(f"net.{k}" for k in net.state_dict())}
