"""Same seed and config, same numbers: data order, augmentation (any number of workers), whole runs."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from modelutil import TINY_CLI

from skinfusion.cli import main
from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.data.sampling import EpochSeededDataset, ResumableSampler, UnpaddedDistributedSampler
from skinfusion.io import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "experiments" / "base.yaml"


def test_sampler_order_is_a_function_of_seed_and_epoch():
    a, b = ResumableSampler(50, seed=3), ResumableSampler(50, seed=3)
    assert list(a) == list(b)
    assert sorted(a) == list(range(50))  # a permutation
    a.set_epoch(1)
    assert list(a) != list(b)  # a new order each epoch...
    assert list(ResumableSampler(50, seed=3, epoch=1)) == list(a)  # ...that depends only on (seed, epoch)
    assert list(ResumableSampler(50, seed=4)) != list(b)


def test_sampler_skips_consumed_samples_once():
    full = list(ResumableSampler(20, seed=1, epoch=2))
    sampler = ResumableSampler(20, seed=1, epoch=2, start=8)
    assert len(sampler) == 20  # Lightning sizes the epoch from the full length
    assert list(sampler) == full[8:]
    assert list(sampler) == full  # the skip applies to one iteration only
    sampler.skip(5)
    sampler.set_epoch(3)  # a pending skip belongs to its epoch
    assert list(sampler) == list(ResumableSampler(20, seed=1, epoch=3))


def test_sampler_shards_like_distributed_sampler():
    shards = [list(ResumableSampler(11, seed=0, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # 11 padded to 12
    merged = [i for s in shards for i in s]
    assert sorted(set(merged)) == list(range(11))
    assert len(merged) - len(set(merged)) == 1
    # Evaluation shards: every sample exactly once, no padding.
    evaluation = [list(UnpaddedDistributedSampler(11, num_replicas=3, rank=r)) for r in range(3)]
    assert [len(s) for s in evaluation] == [4, 4, 3]
    assert sorted(i for s in evaluation for i in s) == list(range(11))


def test_weighted_sampler_is_reproducible():
    weights = [1.0] * 10 + [9.0] * 10
    a = list(ResumableSampler(20, seed=5, weights=weights))
    assert a == list(ResumableSampler(20, seed=5, weights=weights))
    assert sum(i >= 10 for i in a) > 10


@pytest.mark.parametrize("bad", [{"length": -1}, {"length": 3, "start": -1}, {"length": 3, "weights": [1.0, 2.0]}])
def test_sampler_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="must be"):
        ResumableSampler(**bad)


def _batches(num_workers: int, epoch: int = 0) -> list[dict]:
    dm = SkinFusionDataModule(
        synthetic_samples=24,
        synthetic_size=32,
        image_size=32,
        batch_size=4,
        num_workers=num_workers,
        color_jitter=0.3,
        seed=7,
    )
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return list(loader)


def test_augmented_batches_do_not_depend_on_workers():
    reference = _batches(0)
    for other in (_batches(0), _batches(2)):
        assert len(other) == len(reference)
        for a, b in zip(reference, other, strict=True):
            assert a["id"] == b["id"]
            assert torch.equal(a["image"], b["image"])
            assert torch.equal(a["mask"], b["mask"])
    # Different epochs: a different order and different augmentations of the same image.
    later = _batches(0, epoch=1)
    assert [i for b in later for i in b["id"]] != [i for b in reference for i in b["id"]]


def test_epoch_seeded_dataset_augments_by_key():
    dm = SkinFusionDataModule(synthetic_samples=12, synthetic_size=32, image_size=32, color_jitter=0.3, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    dataset = EpochSeededDataset(dm.datasets["train"], seed=1)
    first = dataset[(0, 3)]["image"]
    dataset[(0, 5)]  # whatever was loaded in between does not matter
    assert torch.equal(dataset[(0, 3)]["image"], first)
    assert not torch.equal(dataset[(1, 3)]["image"], first)
    assert len(dataset) == len(dm.datasets["train"])
    assert dataset.labels == dm.datasets["train"].labels  # attributes of the wrapped dataset


def _fit(folder: str) -> tuple[list[dict], dict]:
    main(
        [
            "fit",
            *TINY_CLI,
            "--trainer.max_epochs=2",
            "--trainer.deterministic=true",
            "--trainer.enable_progress_bar=false",
            "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
            f"--trainer.logger.save_dir={folder}",
            "--trainer.callbacks=skinfusion.training.checkpointing.LastCheckpoint",
            "--data.synthetic_samples=24",
            "--data.synthetic_size=32",
            "--data.image_size=32",
            "--data.batch_size=4",
            "--data.num_workers=2",
            "--data.color_jitter=0.2",
        ]
    )
    (metrics,) = Path(folder).glob("**/metrics.csv")
    (last,) = Path(folder).glob("**/last.ckpt")
    return list(csv.DictReader(metrics.open())), load_checkpoint(last)["state_dict"]


@pytest.mark.slow
def test_two_runs_with_workers_and_augmentation_are_identical():
    metrics_a, state_a = _fit("a")
    metrics_b, state_b = _fit("b")
    assert any(row.get("val/loss") for row in metrics_a)
    assert metrics_a == metrics_b
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
