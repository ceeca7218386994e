"""Prediction speed and memory: eager PyTorch vs channels_last/bf16, TorchScript, torch.compile and ONNX Runtime.

    python benchmarks/bench_inference.py                     # full paper network, resnet50, 224 px, CPU: ~5 minutes
    python benchmarks/bench_inference.py --encoder resnet18 --variants eager,compile,onnxruntime
    python benchmarks/bench_inference.py --device cuda --batch-size 64 --variants eager,eager+cl+bf16,compile+cl+bf16

For each variant: images/s on batches of ``--batch-size`` and the latency of a single image (medians of timed
calls after a warm-up), the peak memory of the process (``VmHWM``; on CUDA ``max_memory_allocated``), the
largest difference of its outputs from eager fp32 on the same input, and the fraction of a FLOP-bound ceiling
it reaches: (images/s x forward FLOPs per image, counted with ``torch.utils.flop_counter``) / (FLOP/s of a
2048x2048 matmul measured in the same process right after, in fp32, or bf16 for bf16 variants).

Every variant runs in its own fresh process (so peak memory is its own), in turn, A B C, C B A, ...
(``--rounds``); ``baseline`` (a process that imports torch and builds the network only) gives the memory that
every process pays anyway. ONNX and TorchScript files are exported once with ``skinfusion.inference.export``.

Variants: ``eager`` (``torch.inference_mode``), ``+cl`` (channels_last), ``+bf16`` (autocast), ``torchscript``
(``torch.jit.trace``), ``torchscript+freeze`` (``torch.jit.optimize_for_inference``), ``compile``
(``torch.compile``; minutes to compile on a small CPU), ``onnxruntime`` (CPU execution provider, or CUDA
where onnxruntime-gpu is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _bench import bench_parser, forward_flops, machine, matmul_flops_per_s, median, run_json, spread, sync

from skinfusion.nn import SkinFusionNet

NET_OPTIONS = ("cl", "bf16", "freeze")


def build_net(args: argparse.Namespace) -> SkinFusionNet:
    torch.manual_seed(0)
    return SkinFusionNet(args.encoder, num_classes=7).eval()


def _inputs(args: argparse.Namespace, batch_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)


def make_runner(variant: str, args: argparse.Namespace, workdir: Path, device: torch.device):
    """A callable ``image -> (mask_logits, class_logits)`` for ``variant`` (numpy in, numpy out for ONNX Runtime)."""
    kind, *options = variant.split("+")
    options = set(options)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in options)
    memory_format = torch.channels_last if "cl" in options else torch.contiguous_format
    if kind == "onnxruntime":
        import onnxruntime as ort

        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = torch.get_num_threads()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = ort.InferenceSession(str(workdir / "net.onnx"), session_options, providers=providers)
        names = [o.name for o in session.get_outputs()][:2]

        def run_ort(image: torch.Tensor):
            outputs = session.run(names, {"image": image.cpu().numpy()})
            return tuple(torch.from_numpy(o) for o in outputs)

        return run_ort
    if kind == "torchscript":
        module = torch.jit.load(str(workdir / "net.pt"), map_location=device).eval()
        if "freeze" in options:
            module = torch.jit.optimize_for_inference(module)
        module = module.to(memory_format=memory_format)
    elif kind in ("eager", "compile"):
        net = build_net(args)
        net.load_state_dict(torch.load(workdir / "net.pth", weights_only=True))
        module = net.to(device).to(memory_format=memory_format)
        if kind == "compile":
            module.compile()
    else:
        raise SystemExit(f"unknown variant {variant!r}")

    def run_torch(image: torch.Tensor):
        with torch.inference_mode(), autocast:
            output = module(image.contiguous(memory_format=memory_format))
        return output[0], output[1]

    return run_torch


def peak_rss_mb() -> float:
    """Peak resident memory of this process: ``VmHWM`` (reset by ``exec``, unlike ``ru_maxrss``, which keeps the
    parent's peak from before the fork), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> None:
    """Measure one variant in this (fresh) process and print one JSON line."""
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    workdir = Path(args.workdir)
    result: dict[str, float | str] = {"variant": args.worker}
    if args.worker == "baseline":
        build_net(args)
    else:
        start = time.perf_counter()
        run = make_runner(args.worker, args, workdir, device)
        batch = _inputs(args, args.batch_size, device)
        run(batch)  # warm-up (compile happens here)
        single = _inputs(args, 1, device)
        run(single)
        sync(device)
        result["warmup_s"] = time.perf_counter() - start
        times = []
        for _ in range(args.iters):
            start = time.perf_counter()
            run(batch)
            sync(device)
            times.append(time.perf_counter() - start)
        result["images_per_s"] = args.batch_size / median(times)
        latencies = []
        for _ in range(max(3, args.iters)):
            start = time.perf_counter()
            run(single)
            sync(device)
            latencies.append(time.perf_counter() - start)
        result["latency_ms"] = median(latencies) * 1000
        reference = torch.load(workdir / "reference.pth", weights_only=True)
        outputs = run(_inputs(args, 2, device))
        result["max_diff"] = max(
            float((o.float().cpu() - r).abs().max()) for o, r in zip(outputs, reference, strict=True)
        )
        dtype = torch.bfloat16 if "bf16" in args.worker.split("+") else torch.float32
        result["matmul_flops"] = matmul_flops_per_s(device, dtype=dtype)
    if device.type == "cuda":
        result["peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        result["peak_mb"] = peak_rss_mb()
    print(json.dumps(result))


def run_variant(variant: str, args: argparse.Namespace, workdir: Path) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--workdir", str(workdir)]
    for key in ("encoder", "image_size", "batch_size", "iters", "device", "threads"):
        value = getattr(args, key)
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return run_json(command, variant)


def main() -> None:
    parser = bench_parser(__doc__, "resnet50", 224, 4, rounds=2)
    parser.add_argument("--iters", type=int, default=3, help="timed batches (and >= 3 single images) per run")
    parser.add_argument("--variants", default="eager,eager+cl,eager+bf16,torchscript,onnxruntime")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        worker(args)
        return
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        net = build_net(args)
        flops = forward_flops(net, torch.rand(1, 3, args.image_size, args.image_size))
        torch.save(net.state_dict(), workdir / "net.pth")
        with torch.inference_mode():
            reference = net(_inputs(args, 2, torch.device("cpu")))
        torch.save([reference.mask_logits, reference.class_logits], workdir / "reference.pth")
        print(f"# inference: SkinFusionNet({args.encoder}, CBAM on skips, mask_pool), {args.image_size} px")
        print(f"# {machine(device)}; device {device}; batch {args.batch_size}; {flops / 1e9:.2f} GFLOPs/img forward")
        from skinfusion.inference.export import export_onnx, export_torchscript

        for kind, path, export in (
            ("onnxruntime", "net.onnx", export_onnx),
            ("torchscript", "net.pt", export_torchscript),
        ):
            if any(v.split("+")[0] == kind for v in variants):
                start = time.perf_counter()
                export(net, workdir / path, image_size=args.image_size)
                print(f"# exported {path} in {time.perf_counter() - start:.1f} s")
        del net

        rows: dict[str, list[dict]] = {name: [] for name in ["baseline", *variants]}
        for r in range(args.rounds):
            order = list(rows) if r % 2 == 0 else list(reversed(rows))
            for name in order:
                rows[name].append(run_variant(name, args, workdir))
                row = rows[name][-1]
                print(
                    f"  round {r + 1}/{args.rounds} {name:<22} {row.get('images_per_s', math.nan):8.2f} img/s "
                    f"{row.get('latency_ms', math.nan):8.1f} ms  peak {row['peak_mb']:.0f} MB",
                    flush=True,
                )

    base_mb = median([r["peak_mb"] for r in rows.pop("baseline")])
    eager = rows.get("eager")
    memory = "peak GPU memory (MB)" if device.type == "cuda" else f"peak RSS (MB; bare process {base_mb:.0f})"
    print(
        f"\n| variant | img/s (batch {args.batch_size}) | vs eager | latency 1 image (ms) | {memory} "
        "| max abs diff vs eager fp32 | fraction of matmul FLOP/s | warm-up (s) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, runs in rows.items():
        rates = [r["images_per_s"] for r in runs]
        ratio = (
            f"{median([r['images_per_s'] / e['images_per_s'] for r, e in zip(runs, eager, strict=True)]):.2f}"
            if eager
            else "n/a"
        )
        fraction = [r["images_per_s"] * flops / r["matmul_flops"] for r in runs]
        print(
            f"| {name} | {spread(rates)} | {ratio} | {median([r['latency_ms'] for r in runs]):.1f} "
            f"| {median([r['peak_mb'] for r in runs]):.0f} | {max(r['max_diff'] for r in runs):.1e} "
            f"| {median(fraction) * 100:.0f}% (matmul {median([r['matmul_flops'] for r in runs]) / 1e9:.0f} GFLOP/s) "
            f"| {median([r['warmup_s'] for r in runs]):.1f} |"
        )


if __name__ == "__main__":
    main()
