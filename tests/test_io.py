"""skinfusion.io's one atomic writer: files get the mode a plain open() gives, whatever writes them."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest
import torch

from skinfusion.inference.writers import write_csv
from skinfusion.training.checkpointing import AtomicCheckpointIO


def _checkpoint(path):
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}, "epoch": 1}, path)


def _predictions_csv(path):
    write_csv(path, ["ISIC_0000001"], np.array([[0.25, 0.75]]), ["MEL", "NV"])


def _export(path):
    from modelutil import tiny_net

    from skinfusion.inference.export import export_safetensors

    export_safetensors(tiny_net(), path)


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
@pytest.mark.parametrize(
    ("name", "write"),
    [("last.ckpt", _checkpoint), ("predictions.csv", _predictions_csv), ("model.safetensors", _export)],
)
def test_written_files_get_the_mode_of_a_plain_open(tmp_path, umask, name, write):
    previous = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w"):
            pass
        write(tmp_path / name)
    finally:
        os.umask(previous)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["plain", name])  # no temporary file left
