"""Helpers shared by the benchmark scripts: machine description, timing, alternating rounds, FLOP counts."""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def cpu_model() -> str:
    """``lscpu``'s model name (falls back to ``platform.processor()``)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """One line naming the hardware and software a figure was measured on."""
    cpu = f"{cpu_model()}, {torch.get_num_threads()} torch threads"
    if device.type == "cuda":
        cpu = f"{torch.cuda.get_device_name(device)} + {cpu}"
    return f"{cpu}, torch {torch.__version__}, Python {platform.python_version()}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float]) -> str:
    """``median (min-max, ±x% of the median)``: the noise seen over the rounds."""
    if not values:
        return "n/a"
    mid = median(values)
    half = (max(values) - min(values)) / 2 / mid * 100 if mid else 0.0
    return f"{mid:.2f} ({min(values):.2f}-{max(values):.2f}, ±{half:.0f}%)"


def alternate(variants: dict[str, Callable[[], float]], rounds: int, log: Callable[[str], None] = print):
    """Run every variant once per round, in turn (A B C A B C ...), so machine noise hits all alike.

    Returns:
        ``{name: [value of round 1, value of round 2, ...]}``.
    """
    results: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))  # A B C, C B A: no fixed position
        for name in order:
            value = variants[name]()
            results[name].append(value)
            log(f"  round {r + 1}/{rounds} {name:<28} {value:9.2f}")
    return results


def forward_flops(net: torch.nn.Module, image: torch.Tensor) -> float:
    """FLOPs of one forward pass (1 multiply-add = 2 FLOPs), counted by ``torch.utils.flop_counter``."""
    was_training = net.training
    net.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(image)
    net.train(was_training)
    return float(counter.get_total_flops())


def matmul_flops_per_s(device: torch.device, n: int = 2048, repeats: int = 5, dtype=torch.float32) -> float:
    """Measured FLOP/s of a large square matmul (the machine's practical compute ceiling); best of ``repeats``."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def loop_adamw(params) -> torch.optim.Optimizer:
    """A plain loop's optimiser: PyTorch's AdamW with its CPU default (a Python loop over the parameters),
    not skinfusion's fused default; used where both sides of a comparison must do the same work."""
    return torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4, foreach=False)


def run_json(command: list[str], name: str) -> dict:
    """Run a benchmark worker process and return the JSON object on the last line of its stdout."""
    out = subprocess.run(command, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def add_malloc_option(parser: argparse.ArgumentParser, default: str) -> None:
    """``--malloc {tuned,glibc}``: the process's allocator for the whole run (it cannot be changed back)."""
    parser.add_argument(
        "--malloc",
        choices=("tuned", "glibc"),
        default=default,
        help=f"tuned: skinfusion.allocator.tune_malloc(), as the skinfusion command does; "
        f"glibc: the allocator's defaults, under which page faults land on whatever runs in a "
        f"given heap state (default: {default}; bench_allocator.py compares the two)",
    )


def apply_malloc(args: argparse.Namespace) -> None:
    """Tune the allocator when ``--malloc tuned`` was chosen (see :func:`add_malloc_option`)."""
    if args.malloc == "tuned":
        from skinfusion.allocator import tune_malloc

        tune_malloc()


def bench_parser(doc: str, encoder: str, image_size: int, batch_size: int, rounds: int | None = None):
    """The options every model benchmark shares: network, input size, batch and (where it alternates) rounds."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default=encoder)
    parser.add_argument("--image-size", type=int, default=image_size)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    if rounds is not None:
        parser.add_argument("--rounds", type=int, default=rounds, help="runs of each variant, alternating")
    return parser
