"""Loader throughput: training batches at 224 px from a prepared cache vs straight from the originals.

Reads ``N`` ISIC 2018 Task 1 images (512x512 JPEG + PNG mask) from ``$SKINFUSION_DATA/isic2018``;
without it, generates ``N`` large synthetic JPEGs (``--fake-size``, default 1536 px) instead. The
cache is built with ``skinfusion.data.prepare`` (shorter side 256 px). Each variant runs the same
training pipeline (RandomResizedCrop to 224, flips, rotation, ImageNet normalisation) through a
``DataLoader`` with ``--workers`` processes; one warm-up epoch (page cache, worker start), then
``--epochs`` timed epochs.

    python benchmarks/bench_loader.py [--n 256] [--workers 2] [--batch-size 32] [--epochs 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from skinfusion.data import ISIC_CLASSES, Record, SkinLesionDataset, build_transforms, create_reader
from skinfusion.data.datamodule import seed_worker
from skinfusion.data.prepare import prepare
from skinfusion.data.readers import Reader
from skinfusion.data.synthetic import make_lesion


class _Fixed(Reader):
    """A reader over a given list of records (prepare accepts Reader instances)."""

    name = "bench"

    def __init__(self, records: list[Record]) -> None:
        super().__init__(".")
        self.records = records

    def read(self) -> list[Record]:
        return self.records


def _originals(n: int, workdir: Path, fake_size: int) -> tuple[list[Record], str]:
    data = os.environ.get("SKINFUSION_DATA")
    if data and (Path(data) / "isic2018").is_dir():
        records = create_reader("isic_task1", Path(data) / "isic2018").read()[:n]
        return records, f"ISIC 2018 Task 1 originals (512x512 JPEG) from {data}"
    folder = workdir / "originals"
    folder.mkdir()
    records = []
    for i in range(n):
        image, mask, _ = make_lesion(i % 16, 0, 256)  # upscaled: large files at JPEG size, quick to make
        image = cv2.resize(image, (fake_size, fake_size * 3 // 4), interpolation=cv2.INTER_CUBIC)
        mask = cv2.resize(mask, (fake_size, fake_size * 3 // 4), interpolation=cv2.INTER_NEAREST)
        cv2.imwrite(str(folder / f"FAKE_{i:04d}.jpg"), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
        cv2.imwrite(str(folder / f"FAKE_{i:04d}_segmentation.png"), mask * 255)
        records.append(Record(folder / f"FAKE_{i:04d}.jpg", folder / f"FAKE_{i:04d}_segmentation.png"))
    return records, f"generated {fake_size}x{fake_size * 3 // 4} JPEGs (SKINFUSION_DATA unset)"


def _throughput(records, args, max_side: int | None = None) -> float:
    dataset = SkinLesionDataset(records, ISIC_CLASSES, build_transforms("train", 224, seed=0), max_side=max_side)
    loader = DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.workers,
        worker_init_fn=seed_worker,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=args.workers > 0,
    )
    for _ in loader:  # warm-up epoch
        pass
    start, images = time.perf_counter(), 0
    for _ in range(args.epochs):
        for batch in loader:
            images += batch["image"].shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256, help="images")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs")
    parser.add_argument("--fake-size", type=int, default=1536, help="width of generated originals without data")
    args = parser.parse_args()
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        originals, what = _originals(args.n, workdir, args.fake_size)
        start = time.perf_counter()
        prepare([_Fixed(originals)], workdir / "cache", size=256, workers=1, class_names=None, progress=False)
        prepare_s = time.perf_counter() - start
        cached = create_reader("manifest", workdir / "cache" / "manifest.csv").read()
        sizes = {
            "originals": np.mean([Path(r.image).stat().st_size for r in originals]) / 1024,
            "cache": np.mean([Path(r.image).stat().st_size for r in cached]) / 1024,
        }
        print(f"{args.n} images: {what}; batch {args.batch_size}, {args.workers} workers, output 224 px")
        print(f"prepare (256 px cache, 1 process): {prepare_s:.1f} s = {args.n / prepare_s:.0f} images/s")
        from_cache = _throughput(cached, args)
        print(f"from the prepared cache   ({sizes['cache']:.0f} KiB/image): {from_cache:7.1f} images/s")
        from_originals = _throughput(originals, args)
        print(f"from the originals        ({sizes['originals']:.0f} KiB/image): {from_originals:7.1f} images/s")
        reduced = _throughput(originals, args, max_side=256)
        print(f"from the originals, max_side=256 (reduced JPEG decoding): {reduced:7.1f} images/s")
        print(f"cache / originals: {from_cache / from_originals:.2f}x")


if __name__ == "__main__":
    main()
