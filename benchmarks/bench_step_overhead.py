"""The Trainer's own cost per step, without data loading: SkinFusionModule in a Trainer vs a bare loop.

    python benchmarks/bench_step_overhead.py [--encoder resnet18 --image-size 96 --batch-size 8 --steps 40]
    python benchmarks/bench_step_overhead.py --encoder test_resnet --image-size 32 --batch-size 4 \
        --steps 300 --warmup 20 --threads 1 --rounds 5     # a tiny step: the overhead in milliseconds

Both sides train the same SkinFusionNet with the same MultiTaskLoss and AdamW on the same in-memory
batches (no DataLoader workers), so the difference is Lightning's loop, hooks, logging and the
torchmetrics updates. A third variant turns logging and metrics off to show their share. Rounds
alternate (A B C, C B A, ...); medians of the per-step times after a warm-up. With a real network the
differences are within this 2-core machine's noise (use ``bench_training.py``'s interleaved ratio there);
the tiny-network form measures the fixed cost per step in milliseconds, which is what matters when a
GPU makes steps short.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pytorch_lightning as pl
import torch
from _bench import add_malloc_option, apply_malloc, bench_parser, loop_adamw

from skinfusion import MultiTaskLoss, SkinFusionModule, SkinFusionNet


def make_batches(args: argparse.Namespace) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    b, s = args.batch_size, args.image_size
    return [
        {
            "image": torch.rand(b, 3, s, s, generator=g),
            "mask": (torch.rand(b, 1, s, s, generator=g) > 0.5).float(),
            "has_mask": torch.ones(b, dtype=torch.bool),
            "label": torch.randint(0, 7, (b,), generator=g),
            "id": [str(i) for i in range(b)],
        }
        for _ in range(8)
    ]


def net(args: argparse.Namespace) -> SkinFusionNet:
    torch.manual_seed(0)
    return SkinFusionNet(args.encoder, attention="cbam", decoder_channels=(128, 64, 32, 16, 8))


class StepEnds(pl.Callback):
    def __init__(self) -> None:
        self.ends: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        self.ends.append(time.perf_counter())


def trainer_step_s(args: argparse.Namespace, batches: list[dict], quiet: bool) -> float:
    module = SkinFusionModule(net(args), optimizer=loop_adamw)
    if quiet:
        module.log = lambda *a, **k: None
        module._update_metrics = lambda *a, **k: None
    ends = StepEnds()
    data = [batches[i % len(batches)] for i in range(args.steps)]
    pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[ends],
    ).fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    steps = [b - a for a, b in zip(ends.ends[args.warmup :], ends.ends[args.warmup + 1 :], strict=False)]
    return statistics.median(steps)


def plain_step_s(args: argparse.Namespace, batches: list[dict]) -> float:
    model, loss_fn = net(args).train(), MultiTaskLoss()
    optimizer = loop_adamw(model.parameters())
    times = []
    for i in range(args.steps):
        batch = batches[i % len(batches)]
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(batch["image"]), batch)["loss"].backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[args.warmup :])


def main() -> None:
    parser = bench_parser(__doc__, "resnet18", 96, 8, rounds=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    add_malloc_option(parser, default="tuned")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_malloc(args)
    batches = make_batches(args)
    variants = {
        "plain loop": lambda: plain_step_s(args, batches),
        "Trainer + SkinFusionModule": lambda: trainer_step_s(args, batches, quiet=False),
        "Trainer, logging and metrics off": lambda: trainer_step_s(args, batches, quiet=True),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for r in range(args.rounds):
        for name in order if r % 2 == 0 else reversed(order):
            results[name].append(variants[name]())
    plain = statistics.median(results["plain loop"])
    print(
        f"# {args.encoder}, {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"malloc {args.malloc}"
    )
    print("| variant | ms/step (median over rounds) | images/s | vs plain loop |\n| --- | ---: | ---: | ---: |")
    for name, times in results.items():
        t = statistics.median(times)
        print(f"| {name} | {t * 1000:.2f} | {args.batch_size / t:.1f} | {plain / t:.2f} |")


if __name__ == "__main__":
    main()
