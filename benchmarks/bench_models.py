"""Parameters, FLOPs and CPU throughput of the paper's four ablation configs.

    python benchmarks/bench_models.py                 # ResNet-50, 224 px (the paper's setting)
    python benchmarks/bench_models.py --encoder resnet18 --image-size 128

Prints a markdown table: parameters, GFLOPs per image (forward; 1 multiply-add = 2 FLOPs, counted
with torch.utils.flop_counter), training and inference images/s on this machine's CPU (median of
timed iterations after a warm-up), with the ratio of each config to the baseline measured in
the same run.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
from _bench import bench_parser, forward_flops

from skinfusion.nn import SkinFusionNet
from skinfusion.training.losses import MultiTaskLoss

#: The switches of experiments/paper/{baseline,attention,fusion,full}.yaml.
PAPER_CONFIGS = {
    "baseline": {"attention": None, "attention_placement": [], "decoder": False, "fusion": "none"},
    "attention": {"attention": "spatial", "attention_placement": ["classifier"], "decoder": False, "fusion": "none"},
    "fusion": {"attention": None, "attention_placement": [], "decoder": True, "fusion": "mask_pool"},
    "full": {"attention": "spatial", "attention_placement": ["classifier"], "decoder": True, "fusion": "mask_pool"},
}


def timed(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(name: str, switches: dict, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    net = SkinFusionNet(encoder=args.encoder, num_classes=7, **switches)
    params = sum(p.numel() for p in net.parameters())
    flops = forward_flops(net, torch.rand(1, 3, args.image_size, args.image_size))
    loss_fn = MultiTaskLoss()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    b = args.batch_size
    batch = {
        "image": torch.rand(b, 3, args.image_size, args.image_size),
        "mask": (torch.rand(b, 1, args.image_size, args.image_size) > 0.5).float(),
        "has_mask": torch.ones(b, dtype=torch.bool),
        "label": torch.randint(0, 7, (b,)),
    }

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(net(batch["image"]), batch)["loss"].backward()
        optimizer.step()

    def infer_step():
        with torch.inference_mode():
            net(batch["image"])

    net.train()
    train_s = timed(train_step, args.iters)
    net.eval()
    infer_s = timed(infer_step, args.iters)
    return {"name": name, "params": params, "gflops": flops / 1e9, "train": b / train_s, "infer": b / infer_s}


def main() -> None:
    parser = bench_parser(__doc__, "resnet50", 224, 4)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"# {args.encoder} at {args.image_size} px, batch {args.batch_size}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}"
    )
    rows = [bench(name, switches, args) for name, switches in PAPER_CONFIGS.items()]
    base = rows[0]
    print("| config | params (M) | GFLOPs/img | train img/s | infer img/s | train vs baseline | infer vs baseline |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['name']} | {r['params'] / 1e6:.2f} | {r['gflops']:.2f} | {r['train']:.2f} | {r['infer']:.2f} "
            f"| {r['train'] / base['train']:.2f} | {r['infer'] / base['infer']:.2f} |"
        )


if __name__ == "__main__":
    main()
