"""Optimiser step time: PyTorch's AdamW as a per-parameter loop, ``foreach`` and ``fused``, on the network's parameters.

    python benchmarks/bench_optimizer.py                          # ResNet-18 and ResNet-50 U-Nets: ~1 minute
    python benchmarks/bench_optimizer.py --encoders resnet50 --steps 30

skinfusion's default optimiser (``SkinFusionModule``'s default and ``experiments/base.yaml``) is AdamW with
``fused=True``. All three implementations get the same gradients every step (fixed random gradients) and
step in turn (A B C, A B C, ...); the table gives the median step time and the largest difference of the
weights from the loop's after all steps (float rounding: the same arithmetic in another order).
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench import cpu_model, median

from skinfusion.nn import SkinFusionNet

KINDS = {"loop (PyTorch's CPU default)": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoders", default="resnet18,resnet50")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"# {cpu_model()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, device {device}")
    print("| network | parameters | AdamW | ms / step | vs loop | max abs weight difference vs loop |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for encoder in args.encoders.split(","):
        runs = {}
        for name, options in KINDS.items():
            torch.manual_seed(0)
            net = SkinFusionNet(encoder, attention="cbam", fusion="mask_pool").to(device)
            optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4, **options)
            runs[name] = (net, optimizer, [])
        generator = torch.Generator().manual_seed(0)
        reference = next(iter(runs.values()))[0]
        grads = [torch.randn(p.shape, generator=generator).to(device) * 1e-2 for p in reference.parameters()]
        for step in range(args.warmup + args.steps):
            for net, optimizer, times in runs.values():
                for p, g in zip(net.parameters(), grads, strict=True):
                    p.grad = g.clone()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                optimizer.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if step >= args.warmup:
                    times.append(time.perf_counter() - start)
        loop_ms = median(runs[next(iter(KINDS))][2]) * 1000
        count = sum(p.numel() for p in reference.parameters())
        for name, (net, _, times) in runs.items():
            diff = max(
                float((a - b).abs().max()) for a, b in zip(net.parameters(), reference.parameters(), strict=True)
            )
            ms = median(times) * 1000
            print(f"| {encoder} U-Net | {count / 1e6:.2f} M | {name} | {ms:.2f} | {loop_ms / ms:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
