"""The tiny test network (the ``tiny_net`` fixture), its command-line form, checkpoints, a stand-in network."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from skinfusion.nn import SkinFusionNet
from skinfusion.nn.output import SkinFusionOutput
from skinfusion.training.module import SkinFusionModule

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "base.yaml"

#: The tiny network of the CPU tests: timm's test_resnet (one block per stage), CBAM on the skips, a narrow decoder.
TINY_NET = {"encoder": "test_resnet", "decoder_channels": [16, 16, 8, 8, 8]}
#: The same network on the command line, on the CPU, after ``--config experiments/base.yaml``.
TINY_CLI = [
    "--config",
    str(BASE),
    "--model.net.init_args.encoder=test_resnet",
    "--model.net.init_args.decoder_channels=[16,16,8,8,8]",
    "--trainer.accelerator=cpu",
]
#: The network of the predict/report/export tests: CBAM also before the classifier; 64 px inputs.
NET_CONFIG = {**TINY_NET, "attention_placement": ["skip", "classifier"], "decoder_channels": [32, 16, 16, 8, 8]}
ATTENTION_NAMES = ["skip.0", "skip.1", "skip.2", "skip.3", "skip.4", "classifier"]
IMAGE_SIZE = 64


def tiny_net(seed: int | None = None, **overrides) -> SkinFusionNet:
    """:data:`TINY_NET` with ``overrides``; with a ``seed``, the weights drawn after ``torch.manual_seed(seed)``."""
    if seed is not None:
        torch.manual_seed(seed)
    return SkinFusionNet(**{**TINY_NET, **overrides})


def make_module(seed: int = 0, **overrides) -> SkinFusionModule:
    return SkinFusionModule(tiny_net(seed, **{**NET_CONFIG, **overrides})).eval()


def save_ckpt(path: Path, module: SkinFusionModule, **settings) -> Path:
    """Save ``module`` as a Lightning checkpoint's keys (``from_checkpoint`` reads them), trained at 64 px."""
    hparams = dict(module.hparams)
    hparams["inference"] = {**hparams["inference"], "image_size": IMAGE_SIZE, **settings}
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": hparams}, path)
    return path


class ColourNet(nn.Module):
    """A deterministic stand-in network: lesion where red > blue, fixed class logits.

    With ``normalization="unit"`` the input is the image in [0, 1], so the mask logit of a pixel is
    ``10 * (red - blue)``: pure red gives +10, pure blue -10. The class logits are ``logits`` for
    every image; the attention map ``classifier`` is the red channel at 1/8 resolution.
    """

    def __init__(self, logits=(2.0, 1.0, 0.0, 0.0, 0.0, 0.0, -1.0)) -> None:
        super().__init__()
        self.register_buffer("logits", torch.tensor(logits))
        self.num_classes = len(logits)

    def forward(self, image, meta=None) -> SkinFusionOutput:
        mask_logits = 10.0 * (image[:, 0:1] - image[:, 2:3])
        class_logits = self.logits.expand(image.shape[0], -1)
        attention = {"classifier": nn.functional.avg_pool2d(image[:, 0:1], 8)}
        return SkinFusionOutput(mask_logits, class_logits, attention)


def capability_forced_down() -> bool:
    """ATEN_CPU_CAPABILITY asks for less than this CPU has (e.g. avx2 on an AVX-512 CPU, to emulate an older one)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return os.environ.get("ATEN_CPU_CAPABILITY", "").lower() in ("avx2", "default") and " avx512f" in flags
