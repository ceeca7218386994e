"""``skinfusion.allocator.tune_malloc``, which the ``skinfusion`` command applies for every command.

The allocator settings are process-wide and cannot be undone, so every test that applies them runs a fresh
Python process. Page faults are the observable: with glibc's defaults a tensor above glibc's largest adaptive mmap
threshold (32 MiB) is mapped fresh, and faulted in page by page, every time it is allocated; once tuned,
the freed memory is reused without a fault.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from skinfusion import allocator

glibc_only = pytest.mark.skipif(not allocator._is_glibc(), reason="mallopt tuning applies to glibc only")

STEP_PAGES = 3 * 40 * 2**20 // 4096

# A "step": three 40 MiB activations (each above glibc's largest adaptive mmap threshold, 32 MiB) are
# allocated, written and freed; the faults of the later steps show whether freed memory is reused.
_FAULTS_SCRIPT = """
import json, resource
import torch
from skinfusion.allocator import tune_malloc

def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.empty(40 * 2**20, dtype=torch.uint8).fill_(1) for _ in range(3)]
    del activations
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

result = {"default": [step() for _ in range(4)][2:]}
result["applied"] = tune_malloc()
result["tuned"] = [step() for _ in range(8)][-3:]  # the first steps after tuning grow the heap
print(json.dumps(result))
"""


def _run(script: str, *argv: str, env: dict[str, str] | None = None) -> dict | list:
    """Run ``script`` in a fresh Python process (glibc's allocator defaults) and parse its last line as JSON."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    full_env.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *argv],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_tuning_stops_the_page_faults_of_reallocating_freed_memory():
    result = _run(_FAULTS_SCRIPT)
    # glibc's defaults: every step's blocks are unmapped when freed and faulted back in page by page.
    assert min(result["default"]) >= STEP_PAGES * 0.9
    assert result["applied"] is True
    # Tuned: the freed blocks stay in the heap and are reused.
    assert max(result["tuned"]) < STEP_PAGES * 0.05


@glibc_only
def test_allocator_settings_from_the_environment_are_respected():
    result = _run(_FAULTS_SCRIPT, env={"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "131072"})
    assert result["applied"] is False


def test_non_glibc_systems_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_is_glibc", lambda: False)
    monkeypatch.setattr(allocator, "_tuned", False)
    assert allocator.tune_malloc() is False


def test_every_command_tunes_the_allocator(monkeypatch):
    import skinfusion.cli

    calls = []
    monkeypatch.setattr(skinfusion.cli, "tune_malloc", lambda: calls.append(True) or True)
    with pytest.raises(SystemExit):
        skinfusion.cli.main(["export", "--help"])
    assert calls == [True]


@glibc_only
def test_a_training_run_gives_identical_weights_with_and_without_tuning():
    script = """
    import json, sys
    import pytorch_lightning as pl, torch
    from skinfusion import SkinFusionModule, SkinFusionNet, SkinFusionDataModule
    from skinfusion.allocator import tune_malloc
    if sys.argv[1] == "tuned":
        tune_malloc()
    torch.manual_seed(0)
    module = SkinFusionModule(SkinFusionNet("test_resnet", decoder_channels=[32, 16, 16, 8, 8]))
    data = SkinFusionDataModule(synthetic_samples=24, synthetic_size=64, image_size=48, batch_size=4, num_workers=0)
    pl.Trainer(accelerator="cpu", max_steps=3, limit_val_batches=0, logger=False, enable_checkpointing=False,
               enable_progress_bar=False, enable_model_summary=False).fit(module, datamodule=data)
    print(json.dumps([float(p.double().sum()) for p in module.parameters()]))
    """
    assert _run(script, "default") == _run(script, "tuned")
