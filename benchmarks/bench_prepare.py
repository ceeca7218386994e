"""Benchmark ``prepare`` on large JPEGs: reduced-resolution (DCT-scaled) vs full decoding.

Writes ``--n`` synthetic ``--width`` x ``--height`` JPEGs (default 8 of 4000x3000, the size of
real ISIC 2018 Task 1 downloads) to a temporary folder, then times

* ``read_image(path, max_side=size, side="shortest")`` with ``reduce=True`` and ``reduce=False``;
* the whole ``prepare`` run (validate + resize + write cache + manifest) with and without
  ``--no-reduce``, one worker, so the figures are per core.

Usage::

    python benchmarks/bench_prepare.py [--n 8] [--width 4000] [--height 3000] [--size 256] [--repeat 2]
    python benchmarks/bench_prepare.py --malloc tuned      # as `skinfusion prepare` runs; compare with the above
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from _bench import add_malloc_option, apply_malloc
from PIL import Image

from skinfusion.data.imageio import read_image
from skinfusion.data.prepare import prepare


def make_images(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """Dermoscopy-like JPEGs: smooth background, a dark blob and fine noise (so JPEG has real work)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        cx, cy, r = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6), min(width, height) * 0.25
        lesion = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
        base = np.stack([200 - 120 * lesion, 160 - 110 * lesion, 140 - 100 * lesion], axis=-1)
        noise = rng.normal(0, 6, size=(height // 4, width // 4, 3)).astype(np.float32)
        base += np.kron(noise, np.ones((4, 4, 1), np.float32))
        path = folder / "ISIC2018_Task1-2_Training_Input" / f"ISIC_{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).save(path, quality=92)
        paths.append(path)
    return paths


def time_reads(paths: list[Path], size: int, reduce: bool, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for p in paths:
            read_image(p, max_side=size, side="shortest", reduce=reduce)
        best = min(best, time.perf_counter() - start)
    return len(paths) / best


def time_prepare(root: Path, out: Path, size: int, reduce: bool) -> float:
    start = time.perf_counter()
    report = prepare([f"isic_task1:{root}"], out, size=size, workers=1, reduce=reduce, progress=False)
    elapsed = time.perf_counter() - start
    if report.decoded != report.records:
        raise RuntimeError(f"expected a full run, decoded {report.decoded} of {report.records}")
    return report.records / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--width", type=int, default=4000)
    parser.add_argument("--height", type=int, default=3000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=2)
    add_malloc_option(parser, default="glibc")  # process-wide: compare two runs
    args = parser.parse_args(argv)
    apply_malloc(args)
    print(f"# malloc: {args.malloc}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        paths = make_images(root, args.n, args.width, args.height)
        mb = sum(p.stat().st_size for p in paths) / 1e6
        print(f"{args.n} JPEGs {args.width}x{args.height} ({mb:.1f} MB) written in {time.perf_counter() - t0:.1f} s")
        fast = time_reads(paths, args.size, True, args.repeat)
        full = time_reads(paths, args.size, False, args.repeat)
        print(
            f"read_image -> shorter side {args.size}: reduced {fast:.2f} img/s, full {full:.2f} img/s, "
            f"x{fast / full:.1f}"
        )
        pfast = time_prepare(root, Path(tmp) / "reduced", args.size, True)
        pfull = time_prepare(root, Path(tmp) / "full", args.size, False)
        print(f"prepare (1 worker): reduced {pfast:.2f} img/s, full {pfull:.2f} img/s, x{pfast / pfull:.1f}")


if __name__ == "__main__":
    main()
