"""Metadata dropout removes the "metadata missing" shortcut.

The set-up is the pool's in miniature: classes 0 and 1 come only without metadata (as ISIC Task 1 images),
classes 2 and 3 always with it (as HAM10000 images). The image shows the class, more weakly than the metadata
marks the two groups. Trained without dropout, a network may read "metadata missing" as "class 0 or 1"; trained
with metadata withheld at random, every class stays reachable from the image alone.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from skinfusion.data.dataset import META_DIM, encode_metadata, unknown_metadata, withhold_metadata
from tests.modelutil import tiny_net

CLASS_META = [{}, {}, {"age": 70, "sex": "male", "site": "back"}, {"age": 30, "sex": "female", "site": "face"}]
COLOURS = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.9, 0.1], [0.1, 0.1, 0.9], [0.9, 0.9, 0.1]])


def _images(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = 0.15 * torch.randn(len(labels), 3, 32, 32, generator=generator)
    return COLOURS[labels][:, :, None, None] + noise


def _train(metadata_dropout: float, steps: int = 80) -> torch.nn.Module:
    net = tiny_net(
        0, decoder=False, fusion="none", attention=None, attention_placement=[], num_classes=4, meta_dim=META_DIM
    )
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    net.train()
    for _ in range(steps):
        labels = torch.randint(0, 4, (32,), generator=generator)
        meta = torch.from_numpy(
            np.stack([encode_metadata(withhold_metadata(CLASS_META[int(y)], rng, metadata_dropout)) for y in labels])
        )
        loss = F.cross_entropy(net(_images(labels, generator), meta).class_logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


def test_metadata_dropout_keeps_every_class_reachable_without_metadata():
    net = _train(metadata_dropout=0.5)
    generator = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(16)
    images = _images(labels, generator)
    meta = torch.from_numpy(np.stack([encode_metadata(CLASS_META[int(y)]) for y in labels]))
    with torch.no_grad():
        with_meta = net(images, meta).class_logits.softmax(-1)
        without = net(images, unknown_metadata(meta)).class_logits.softmax(-1)
    # The metadata is used: it changes the outputs of the images that have it.
    assert (with_meta[32:] - without[32:]).abs().max() > 1e-3
    # Without metadata every class is predicted, and mostly for its own images.
    predicted = without.argmax(-1)
    assert set(predicted.tolist()) == {0, 1, 2, 3}
    recall = [(predicted[labels == c] == c).float().mean().item() for c in range(4)]
    assert min(recall) > 0.5, recall
