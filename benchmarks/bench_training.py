"""Training images/s: skinfusion (a real ``pl.Trainer``) against a hand-written PyTorch loop, and the speed options.

    python benchmarks/bench_training.py                       # resnet18 U-Net, 96 px, batch 8, CPU: ~4 minutes
    python benchmarks/bench_training.py --encoder resnet50 --image-size 224 --batch-size 4 --iters 3
    python benchmarks/bench_training.py --variants skinfusion,skinfusion+compile --no-interleave
    python benchmarks/bench_training.py --device cuda --image-size 224 --batch-size 64 \\
        --variants plain,skinfusion,skinfusion+bf16+cl,skinfusion+bf16+cl+uint8

Both sides train the same network on the same batches:

* ``plain``: ``timm.create_model(features_only=True)`` + smp ``UnetDecoder`` + ``SegmentationHead`` + global
  pooling, dropout and a linear classifier, written out here, with the loss math written out (Dice+BCE over the
  images with a mask, cross-entropy over the labelled ones), AdamW, ``zero_grad/backward/step``.
* ``skinfusion``: ``pl.Trainer.fit(SkinFusionModule(SkinFusionNet(attention=None, fusion="none")),
  SkinFusionDataModule(...))`` with per-step loss logging and train metrics as in real runs (no logger,
  checkpointing or progress bar; validation off), and skinfusion's default optimiser, fused AdamW. The
  ``+loopadam`` variant uses the plain loop's optimiser (PyTorch's default AdamW, a loop over parameters on
  CPU) instead: that pair does exactly the same work, so its ratio is the framework's own cost.

Both read ``SkinFusionDataModule.train_dataloader()`` of the same synthetic data set (same samples, same
augmentation). A step's time is the interval between the ends of consecutive optimiser steps, so data
loading, transfer, forward, backward, the optimiser and every framework hook are inside it; the first
``--warmup`` steps are left out. With ``--interleave`` (the default) every skinfusion run also does one plain
step after each of its own steps (A B A B at step level), so the two see the same machine load and their ratio
is measured within the run; ``plain`` as a variant runs the loop on its own instead. Variants run in turn,
A B C, C B A, ... (``--rounds``); the tables give the median over rounds and the spread (the noise).

Both sides share the process, so they share its allocator: ``--malloc tuned`` (the default, as in
``experiments/base.yaml``) or glibc's defaults (``--malloc glibc``), under which the page faults of
returning memory to the kernel land on whichever loop happens to run in a given heap state (measured
differences up to 10% in either direction that have nothing to do with either loop; ``bench_allocator.py``
measures the allocator itself, each variant in its own process).

Speed options, joined with ``+`` to ``skinfusion``: ``cl`` (``channels_last``), ``uint8``
(``normalize_on_device``), ``bf16``/``fp16`` (``trainer.precision="bf16-mixed"``/``"16-mixed"``), ``compile``
(``torch.compile``; slow to start), ``wN`` (``N`` loader workers), ``pin`` (``pin_memory``), ``nometrics``
(``model.train_metrics=false``: losses logged, no training-batch metrics; the plain loop computes none),
``loopadam`` (the plain loop's unfused AdamW instead of skinfusion's fused default).

The last section compares the loader alone (in the main process, i.e. the rate of one worker) with the rate
the fastest variant consumes images at, and says how many workers keep up.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings

import pytorch_lightning as pl
import timm
import torch
import torch.nn.functional as F
from _bench import (
    add_malloc_option,
    alternate,
    apply_malloc,
    bench_parser,
    forward_flops,
    loop_adamw,
    machine,
    median,
    spread,
    sync,
)
from segmentation_models_pytorch.base import SegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder
from torch import nn

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.nn import SkinFusionNet
from skinfusion.training.module import SkinFusionModule

NUM_CLASSES = 7
OPTIONS = ("cl", "uint8", "bf16", "fp16", "compile", "pin", "nometrics", "loopadam")


class PlainNet(nn.Module):
    """The network written directly with timm and smp (no skinfusion code)."""

    def __init__(self, encoder: str, decoder_channels: list[int], num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.encoder = timm.create_model(encoder, features_only=True, pretrained=False)
        channels = self.encoder.feature_info.channels()
        self.decoder = UnetDecoder(
            encoder_channels=[3, *channels], decoder_channels=decoder_channels, n_blocks=len(channels)
        )
        self.segmentation_head = SegmentationHead(decoder_channels[-1], 1, kernel_size=3)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(channels[-1], num_classes))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.encoder(image)
        try:
            decoded = self.decoder([image, *features])
        except TypeError:  # smp < 0.5 takes the features as *args
            decoded = self.decoder(image, *features)
        return self.segmentation_head(decoded), self.classifier(features[-1].mean((2, 3)))


def plain_loss(mask_logits, class_logits, batch) -> torch.Tensor:
    """Dice + BCE over the images with a mask, plus cross-entropy over the labelled images (as MultiTaskLoss)."""
    weights = batch["has_mask"].float()
    logits, target = mask_logits.float().flatten(1), batch["mask"].flatten(1)
    probs = logits.sigmoid()
    dice = (2 * (probs * target).sum(1) + 1) / (probs.sum(1) + target.sum(1) + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(1)
    n = weights.sum().clamp_min(1)
    seg = ((1 - dice) * weights).sum() / n + (bce * weights).sum() / n
    labelled = batch["label"] >= 0
    cls = F.cross_entropy(class_logits.float(), batch["label"], ignore_index=-1) if labelled.any() else 0.0
    return seg + cls


class StepTimer(pl.Callback):
    """Timestamps of every training batch's start and end (after the optimiser step)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.starts: list[float] = []
        self.ends: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.ends.append(time.perf_counter())


def bench_trainer(
    device: torch.device, max_steps: int, callbacks: list[pl.Callback], precision: str = "32-true"
) -> pl.Trainer:
    """A Trainer that only trains: no validation, logger, checkpoints, progress bar or model summary."""
    return pl.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


class PlainSteps:
    """The hand-written loop, one step at a time (so that it can run between the Trainer's steps)."""

    def __init__(self, bench: Bench) -> None:
        torch.manual_seed(0)
        self.device = bench.device
        self.net = PlainNet(bench.args.encoder, bench.decoder_channels).to(bench.device).train()
        self.optimizer = loop_adamw(self.net.parameters())
        self.batches = iter(bench.datamodule().train_dataloader())

    def step(self) -> None:
        batch = next(self.batches)
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
        with torch.enable_grad():
            self.optimizer.zero_grad(set_to_none=True)
            mask_logits, class_logits = self.net(batch["image"])
            plain_loss(mask_logits, class_logits, batch).backward()
            self.optimizer.step()
        sync(self.device)


class Interleave(pl.Callback):
    """Runs one plain step after each Trainer step (A B A B at step level: both see the same machine load).

    A Trainer step is timed from the end of the plain step before it to the end of its own optimiser step, so
    it includes fetching its batch, the transfer, every hook, forward, backward and the optimiser.
    """

    def __init__(self, plain: PlainSteps, device: torch.device) -> None:
        self.plain = plain
        self.device = device
        self.framework: list[float] = []
        self.plain_times: list[float] = []
        self.plain_ends: list[float] = []
        self._last = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        now = time.perf_counter()
        if self._last is not None:
            self.framework.append(now - self._last)
        self.plain.step()
        self._last = time.perf_counter()
        self.plain_times.append(self._last - now)
        self.plain_ends.append(self._last)


def step_stats(starts: list[float], ends: list[float], warmup: int, batch_size: int) -> tuple[float, float]:
    """(images/s from the median step interval, median share of a step spent before the batch reached the step)."""
    steps = [ends[i] - ends[i - 1] for i in range(warmup + 1, len(ends))]
    waits = [(starts[i] - ends[i - 1]) / (ends[i] - ends[i - 1]) for i in range(warmup + 1, len(ends))]
    return batch_size / median(steps), median(waits)


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.steps = args.warmup + args.iters + 1
        # Enough training images for every step in one epoch (an epoch end would add its own work to a step).
        self.samples = math.ceil((self.steps + 3) * args.batch_size / 0.7) + 8
        self.decoder_channels = [int(c) for c in args.decoder_channels.split(",")]
        self.wait: dict[str, list[float]] = {}
        self.interleaved: dict[str, list[tuple[float, float]]] = {}
        self._datamodules: dict[tuple, SkinFusionDataModule] = {}

    def datamodule(self, uint8: bool = False, workers: int | None = None, pin: bool = False) -> SkinFusionDataModule:
        workers = self.args.workers if workers is None else workers
        key = (uint8, workers, pin)
        if key not in self._datamodules:
            dm = SkinFusionDataModule(
                synthetic_samples=self.samples,
                synthetic_size=max(64, self.args.image_size),
                image_size=self.args.image_size,
                batch_size=self.args.batch_size,
                num_workers=workers,
                persistent_workers=False,
                pin_memory=pin,
                normalization="imagenet",
                normalize_on_device=uint8,
            )
            dm.prepare_data()
            dm.setup("fit")
            self._datamodules[key] = dm
        return self._datamodules[key]

    def plain(self) -> float:
        args, device = self.args, self.device
        torch.manual_seed(0)
        net = PlainNet(args.encoder, self.decoder_channels).to(device).train()
        optimizer = loop_adamw(net.parameters())
        loader = self.datamodule().train_dataloader()
        starts, ends = [], []
        for step, batch in enumerate(loader):
            if step == self.steps:
                break
            starts.append(time.perf_counter())
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            optimizer.zero_grad(set_to_none=True)
            mask_logits, class_logits = net(batch["image"])
            plain_loss(mask_logits, class_logits, batch).backward()
            optimizer.step()
            sync(device)
            ends.append(time.perf_counter())
        rate, wait = step_stats(starts, ends, self.args.warmup, args.batch_size)
        self.wait.setdefault("plain", []).append(wait)
        return rate

    def skinfusion(self, name: str) -> float:
        args = self.args
        options = set(name.split("+")[1:])
        workers = next((int(o[1:]) for o in options if o[:1] == "w" and o[1:].isdigit()), None)
        unknown = {o for o in options if o not in OPTIONS and not (o[:1] == "w" and o[1:].isdigit())}
        if unknown:
            raise SystemExit(f"unknown option(s) {sorted(unknown)} in {name!r}; options: {OPTIONS} and wN")
        torch.manual_seed(0)
        net = SkinFusionNet(
            args.encoder, attention=None, fusion="none", decoder_channels=self.decoder_channels, num_classes=NUM_CLASSES
        )
        extra = {"optimizer": loop_adamw} if "loopadam" in options else {}
        module = SkinFusionModule(
            net,
            **extra,
            channels_last="cl" in options,
            compile="compile" in options,
            train_metrics="nometrics" not in options,
        )
        timer = StepTimer(self.device)
        interleave = Interleave(PlainSteps(self), self.device) if self.args.interleave else None
        precision = "bf16-mixed" if "bf16" in options else "16-mixed" if "fp16" in options else "32-true"
        warmup = args.warmup + (3 if "compile" in options else 0)
        trainer = bench_trainer(
            self.device,
            self.steps + warmup - args.warmup,
            [timer] + ([interleave] if interleave else []),
            precision,
        )
        trainer.fit(module, datamodule=self.datamodule("uint8" in options, workers, "pin" in options))
        rate, wait = step_stats(timer.starts, timer.ends, warmup, args.batch_size)
        if interleave is not None:  # a step starts where the plain step before it ended
            wait = median(
                [
                    (timer.starts[i] - interleave.plain_ends[i - 1]) / (timer.ends[i] - interleave.plain_ends[i - 1])
                    for i in range(warmup + 1, len(timer.ends))
                ]
            )
        self.wait.setdefault(name, []).append(wait)
        if interleave is not None:  # same run, steps alternating: the ratio that machine noise cannot bias
            rate = args.batch_size / median(interleave.framework[warmup:])
            plain_rate = args.batch_size / median(interleave.plain_times[warmup:])
            self.interleaved.setdefault(name, []).append((rate, plain_rate))
        return rate

    def loader_rate(self, uint8: bool, batches: int) -> float:
        """Images/s of the training loader alone, in the main process (what one worker delivers)."""
        loader = self.datamodule(uint8, workers=0).train_dataloader()
        iterator = iter(loader)
        next(iterator)
        start, images = time.perf_counter(), 0
        for _, batch in zip(range(batches), iterator, strict=False):
            images += batch["image"].shape[0]
        return images / (time.perf_counter() - start)


def main() -> None:
    parser = bench_parser(__doc__, "resnet18", 96, 8, rounds=3)
    parser.add_argument("--iters", type=int, default=4, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run (+3 with compile)")
    parser.add_argument("--workers", type=int, default=0, help="loader workers of every variant without +wN")
    parser.add_argument("--decoder-channels", default="256,128,64,32,16")
    parser.add_argument(
        "--variants", default="skinfusion+loopadam,skinfusion,skinfusion+cl,skinfusion+uint8,skinfusion+bf16"
    )
    parser.add_argument(
        "--interleave",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run a plain-loop step after every Trainer step and compare the two within each run",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    add_malloc_option(parser, default="tuned")
    args = parser.parse_args()
    apply_malloc(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    bench = Bench(args)
    device = bench.device

    plain_net = PlainNet(args.encoder, bench.decoder_channels)
    sf_net = SkinFusionNet(args.encoder, attention=None, fusion="none", decoder_channels=bench.decoder_channels)
    image = torch.rand(1, 3, args.image_size, args.image_size)
    params = [sum(p.numel() for p in n.parameters()) for n in (plain_net, sf_net)]
    flops = [forward_flops(n, image) for n in (plain_net, sf_net)]
    print(f"# training: {args.encoder} U-Net + linear classifier, {args.image_size} px, batch {args.batch_size}")
    print(f"# {machine(device)}; device {device}; loader workers {args.workers}; malloc {args.malloc}")
    print(
        f"# same network: params plain {params[0] / 1e6:.3f} M / skinfusion {params[1] / 1e6:.3f} M, "
        f"forward GFLOPs/img {flops[0] / 1e9:.3f} / {flops[1] / 1e9:.3f}"
    )
    variants = {}
    for name in args.variants.split(","):
        variants[name] = bench.plain if name == "plain" else (lambda n=name: bench.skinfusion(n))
    bench.datamodule()  # write the synthetic data before any timing
    results = alternate(variants, args.rounds)

    reference = "plain" if "plain" in results else next(iter(results))
    print(f"\n| variant | train img/s (median, range, noise) | vs {reference} | data wait / step |")
    print("| --- | ---: | ---: | ---: |")
    for name, values in results.items():
        ratio = [v / r for v, r in zip(values, results[reference], strict=True)]  # same round, same conditions
        print(
            f"| {name} | {spread(values)} | {median(ratio):.2f} (per round {min(ratio):.2f}-{max(ratio):.2f}) "
            f"| {median(bench.wait[name]) * 100:.1f}% |"
        )

    if bench.interleaved:
        print("\n# interleaved within each run (Trainer step, plain step, Trainer step, ...): the robust ratio")
        print("| variant | skinfusion img/s | plain img/s (same run) | skinfusion / plain (median, per run) |")
        print("| --- | ---: | ---: | ---: |")
        for name, pairs in bench.interleaved.items():
            ratios = [a / b for a, b in pairs]
            print(
                f"| {name} | {spread([a for a, _ in pairs])} | {spread([b for _, b in pairs])} "
                f"| {median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |"
            )

    best_name = max(results, key=lambda n: median(results[n]))
    required = median(results[best_name])
    print(f"\n# loader alone vs consumption (fastest variant: {best_name}, {required:.1f} img/s)")
    batches = max(4, min(bench.samples * 7 // 10 // args.batch_size - 1, 12))
    for uint8 in (False, True):
        rates = [bench.loader_rate(uint8, batches) for _ in range(3)]
        per_worker = median(rates)
        print(
            f"loader {'uint8 (normalize_on_device)' if uint8 else 'float32 (normalise in workers)':<32} "
            f"{spread(rates)} img/s per worker = {per_worker / required:.1f}x the consumption; "
            f"workers to keep up: {math.ceil(required / per_worker)}"
        )


if __name__ == "__main__":
    main()
