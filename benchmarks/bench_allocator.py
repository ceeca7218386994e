"""CPU allocator: glibc's defaults against ``skinfusion.allocator.tune_malloc`` (the ``skinfusion`` command's).

    python benchmarks/bench_allocator.py                   # ResNet-18 U-Net 96 px batch 8 + ResNet-50 inference: ~5 min
    python benchmarks/bench_allocator.py --encoder resnet50 --image-size 224 --batch-size 4 --steps 8
    python benchmarks/bench_allocator.py --no-inference --rounds 5

Every variant runs in a fresh process (the allocator settings are process-wide and cannot be undone), in
alternating order over ``--rounds`` (A B C D, D C B A, ...). Training variants:

* ``plain`` / ``plain+tuned``: the hand-written timm + smp loop of ``bench_training.py`` with glibc's defaults /
  after ``tune_malloc()``;
* ``skinfusion`` / ``skinfusion+tuned``: ``pl.Trainer.fit(SkinFusionModule(...))`` on the same network, data and
  optimiser (PyTorch's default AdamW), without / with ``tune_malloc()``;
* ``skinfusion+tuned+fused``: also skinfusion's default optimiser, fused AdamW: the CPU defaults of
  ``experiments/base.yaml``. Its weights differ from the unfused runs by float rounding only.

Each reports images/s (median step interval after ``--warmup`` steps; data loading in the main process
included), minor page faults and kernel (system) CPU time per step, the peak resident memory, and how far
its final weights (training) or outputs (inference) are from the untuned run's: bit-identical with and
without tuning shows that the results do not change.
The inference variants run the default network (``experiments/base.yaml``: ResNet-50, CBAM on the skips,
mask-pooled fusion) on batches at ``--infer-size`` px in ``torch.inference_mode``.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _bench import bench_parser, cpu_model, loop_adamw, median, run_json, spread

TRAIN_VARIANTS = ("plain", "plain+tuned", "skinfusion", "skinfusion+tuned", "skinfusion+tuned+fused")
INFER_VARIANTS = ("infer", "infer+tuned")


def per_step(marks: list[tuple[float, int, float]], warmup: int, batch: int) -> dict[str, float]:
    """images/s, faults/step, kernel ms/step from (time, faults, kernel s) marks at the end of each step."""
    steps = list(zip(marks[warmup:], marks[warmup + 1 :], strict=False))
    return {
        "img_s": batch / median([b[0] - a[0] for a, b in steps]),
        "faults": median([b[1] - a[1] for a, b in steps]),
        "kernel_ms": median([(b[2] - a[2]) * 1000 for a, b in steps]),
    }


def mark() -> tuple[float, int, float]:
    """(time, minor page faults, kernel CPU seconds) of this process now."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), usage.ru_minflt, usage.ru_stime


def save_result(tensors, path: str) -> str:
    """Store the run's final weights or outputs, as one flat tensor, for the comparison between variants."""
    torch.save(torch.cat([t.detach().flatten().float() for t in tensors]), path)
    return path


def train_worker(args: argparse.Namespace, variant: str) -> dict:
    import pytorch_lightning as pl
    from bench_training import Bench, PlainSteps, bench_trainer

    from skinfusion.allocator import tune_malloc
    from skinfusion.nn import SkinFusionNet
    from skinfusion.training.module import SkinFusionModule

    bench_args = argparse.Namespace(
        encoder=args.encoder,
        image_size=args.image_size,
        batch_size=args.batch_size,
        iters=args.steps,
        warmup=args.warmup,
        workers=0,
        decoder_channels="256,128,64,32,16",
        interleave=False,
        device="cpu",
    )
    bench = Bench(bench_args)
    datamodule = bench.datamodule()  # writes the synthetic data set before any tuning or timing
    tuned = "+tuned" in variant
    marks: list[tuple[float, int, float]] = []
    if tuned:  # before the first step, as the skinfusion command does
        tune_malloc()
    if variant.startswith("plain"):
        plain = PlainSteps(bench)
        for _ in range(bench.steps):
            plain.step()
            marks.append(mark())
        net = plain.net
    else:

        class Marks(pl.Callback):
            def on_train_batch_end(self, *_) -> None:
                marks.append(mark())

        torch.manual_seed(0)
        net = SkinFusionNet(
            args.encoder, attention=None, fusion="none", decoder_channels=bench.decoder_channels, num_classes=7
        )
        module = SkinFusionModule(net) if "+fused" in variant else SkinFusionModule(net, optimizer=loop_adamw)
        trainer = bench_trainer(bench.device, bench.steps, [Marks()])
        trainer.fit(module, datamodule=datamodule)
    weights = save_result(net.parameters(), args.out)
    return {**per_step(marks, args.warmup, args.batch_size), "weights": weights}


def infer_worker(args: argparse.Namespace, variant: str) -> dict:
    from skinfusion.allocator import tune_malloc
    from skinfusion.nn import SkinFusionNet

    if variant.endswith("+tuned"):
        tune_malloc()
    torch.manual_seed(0)
    net = SkinFusionNet(
        "resnet50", attention="cbam", attention_placement=("skip",), fusion="mask_pool", num_classes=7
    ).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.infer_batch, 3, args.infer_size, args.infer_size, generator=generator)
    marks = []
    outputs = []
    with torch.inference_mode():
        for _ in range(args.infer_steps + args.warmup + 1):
            output = net(images)
            outputs = [output.mask_logits.flatten(), output.class_logits.flatten()]
            marks.append(mark())
    return {**per_step(marks, args.warmup, args.infer_batch), "weights": save_result(outputs, args.out)}


def run_variant(args: argparse.Namespace, variant: str) -> dict:
    """One variant in a fresh process; its JSON result plus the peak RSS."""
    out_file = Path(args.tmp) / f"{variant}-{len(list(Path(args.tmp).iterdir()))}.pt"
    command = [sys.executable, __file__, "--worker", variant, "--out", str(out_file), *args.passthrough]
    return run_json(command, variant)


def main() -> None:
    parser = bench_parser(__doc__, "resnet18", 96, 8, rounds=3)
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (or inference batches) per run")
    parser.add_argument("--infer-size", type=int, default=224)
    parser.add_argument("--infer-batch", type=int, default=8)
    parser.add_argument("--infer-steps", type=int, default=6, help="timed inference batches per run")
    parser.add_argument("--inference", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    if args.worker:
        result = (infer_worker if args.worker.startswith("infer") else train_worker)(args, args.worker)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return

    args.passthrough = [a for a in sys.argv[1:] if a not in ("--inference", "--no-inference")]
    with tempfile.TemporaryDirectory() as tmp:
        args.tmp = tmp
        compare(args)


def compare(args: argparse.Namespace) -> None:
    groups = [("train", TRAIN_VARIANTS, "plain")]
    if args.inference:
        groups.append(("infer", INFER_VARIANTS, "infer"))
    print(f"# {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print(
        f"# training: {args.encoder} U-Net, {args.image_size} px, batch {args.batch_size}, {args.steps} timed steps; "
        f"inference: ResNet-50 default network, {args.infer_size} px, batch {args.infer_batch}"
    )
    for title, variants, reference in groups:
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.rounds):
            for variant in variants if r % 2 == 0 else tuple(reversed(variants)):
                result = run_variant(args, variant)
                results[variant].append(result)
                print(f"  round {r + 1}/{args.rounds} {variant:<18} {result['img_s']:8.2f} img/s", flush=True)
        print(
            f"\n| {title} variant | img/s (median, range) | vs {reference} | page faults / step "
            "| kernel ms / step | peak RSS MiB | result vs untuned |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
        for variant, runs in results.items():
            rates = [run["img_s"] for run in runs]
            ratios = [a["img_s"] / b["img_s"] for a, b in zip(runs, results[reference], strict=True)]
            base = results[variant.split("+")[0]]
            if base is runs:
                same_text = "(reference)"
            else:
                diff = max(
                    float((torch.load(a["weights"]) - torch.load(b["weights"])).abs().max())
                    for a, b in zip(runs, base, strict=True)
                )
                same_text = "yes, bit-identical" if diff == 0 else f"max abs difference {diff:.1e}"
            print(
                f"| {variant} | {spread(rates)} | {median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
                f"| {median([run['faults'] for run in runs]):,.0f} | {median([run['kernel_ms'] for run in runs]):.1f} "
                f"| {median([run['peak_rss_mib'] for run in runs]):,.0f} | {same_text} |"
            )
        if title == "train":
            pairs = zip(results["skinfusion+tuned+fused"], results["plain"], strict=True)
            tuned = [a["img_s"] / b["img_s"] for a, b in pairs]
            print(
                "\nskinfusion with base.yaml's CPU defaults (tuned allocator + fused AdamW) vs the plain loop with "
                f"glibc's and PyTorch's defaults: {median(tuned):.2f}x "
                f"(per round {min(tuned):.2f}-{max(tuned):.2f})"
            )
    print(f"\n# {Path(__file__).name}: each variant ran {args.rounds} times in its own process")


if __name__ == "__main__":
    main()
