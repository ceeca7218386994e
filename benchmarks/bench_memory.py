"""Resident memory over a long run: it must not grow after the first epoch.

Trains the tiny ``test_resnet`` SkinFusionNet on synthetic lesions for ``--epochs`` epochs (CPU,
``--workers`` persistent DataLoader workers, validation every epoch, checkpoints every epoch) and,
at the end of each epoch, reads the resident memory of the main process and of every DataLoader
worker from ``/proc`` (Linux): RSS (what ``top`` shows; pages shared by forked workers counted once
per process) and PSS (shared pages split between the processes that share them; sums to the real
total). Prints one line per epoch and the growth from the end of epoch 1 to the end of the run.

    python benchmarks/bench_memory.py [--epochs 20] [--samples 160] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import pytorch_lightning as pl
from _bench import add_malloc_option, apply_malloc

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.nn import SkinFusionNet
from skinfusion.training.checkpointing import LastCheckpoint
from skinfusion.training.module import SkinFusionModule

PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def _descendants(pid: int) -> list[int]:
    children: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.is_dir() else []:
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return [p for c in children for p in (c, *_descendants(c))]


def _rss(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE


def _pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def memory() -> dict[str, float]:
    """RSS/PSS in MiB of this process and of its descendants (DataLoader workers)."""
    main = os.getpid()
    workers = []
    for pid in _descendants(main):
        try:
            workers.append((_rss(pid), _pss(pid)))
        except OSError:  # exited meanwhile
            continue
    return {
        "main_rss": _rss(main) / MIB,
        "workers_rss": sum(r for r, _ in workers) / MIB,
        "total_rss": (_rss(main) + sum(r for r, _ in workers)) / MIB,
        "total_pss": (_pss(main) + sum(p for _, p in workers)) / MIB,
        "workers": len(workers),
    }


class MemoryProbe(pl.Callback):
    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        figures = memory()
        self.epochs.append(figures)
        print(
            f"epoch {len(self.epochs):3d}: main RSS {figures['main_rss']:8.1f} MiB  "
            f"workers RSS {figures['workers_rss']:8.1f} MiB ({figures['workers']:.0f})  "
            f"total RSS {figures['total_rss']:8.1f} MiB  total PSS {figures['total_pss']:8.1f} MiB",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--samples", type=int, default=160)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=64)
    add_malloc_option(parser, default="tuned")  # tuned, as the skinfusion command runs
    args = parser.parse_args()
    apply_malloc(args)

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("SKINFUSION_CACHE", str(Path(tmp) / "cache"))
        data = SkinFusionDataModule(
            synthetic_samples=args.samples,
            synthetic_size=args.image_size,
            image_size=args.image_size,
            batch_size=16,
            num_workers=args.workers,
            persistent_workers=True,
            color_jitter=0.2,
        )
        module = SkinFusionModule(SkinFusionNet(encoder="test_resnet", decoder_channels=(16, 16, 8, 8, 8)))
        probe = MemoryProbe()
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=args.epochs,
            default_root_dir=tmp,
            logger=pl.loggers.CSVLogger(tmp),
            callbacks=[probe, LastCheckpoint(every_n_train_steps=0)],
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(module, data)

    first, last = probe.epochs[0], probe.epochs[-1]
    peak = max(e["total_rss"] for e in probe.epochs[1:]) if len(probe.epochs) > 1 else first["total_rss"]
    print(
        f"\ngrowth after epoch 1 (epoch {len(probe.epochs)} - epoch 1): "
        f"main RSS {last['main_rss'] - first['main_rss']:+.1f} MiB, "
        f"total RSS {last['total_rss'] - first['total_rss']:+.1f} MiB, "
        f"total PSS {last['total_pss'] - first['total_pss']:+.1f} MiB; "
        f"peak total RSS after epoch 1: {peak:.1f} MiB (epoch 1: {first['total_rss']:.1f} MiB)"
    )


if __name__ == "__main__":
    main()
