"""Tiny networks and checkpoints for the predict/report/export tests."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from skinfusion.nn import SkinFusionNet
from skinfusion.nn.output import SkinFusionOutput
from skinfusion.training.module import SkinFusionModule

#: test_resnet with CBAM on the skips and before the classifier, narrow decoder; 64 px inputs.
NET_CONFIG = {
    "encoder": "test_resnet",
    "attention": "cbam",
    "attention_placement": ["skip", "classifier"],
    "decoder_channels": [32, 16, 16, 8, 8],
}
ATTENTION_NAMES = ["skip.0", "skip.1", "skip.2", "skip.3", "skip.4", "classifier"]
IMAGE_SIZE = 64


def make_module(seed: int = 0, **overrides) -> SkinFusionModule:
    torch.manual_seed(seed)
    net = SkinFusionNet(**{**NET_CONFIG, **overrides})
    return SkinFusionModule(net).eval()


def save_ckpt(path: Path, module: SkinFusionModule, config: dict | None = None, **datamodule) -> Path:
    """Save ``module`` in the format ``SkinFusionModule.from_checkpoint`` reads (a Lightning checkpoint's keys)."""
    hparams = dict(module.hparams)
    hparams["net_config"] = dict(config or hparams.get("net_config") or NET_CONFIG)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": hparams,
            "datamodule_hyper_parameters": {"image_size": IMAGE_SIZE, "normalization": "imagenet", **datamodule},
        },
        path,
    )
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
