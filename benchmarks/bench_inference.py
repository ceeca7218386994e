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

``--int8`` compares instead, for the paper's network (ResNet-50 U-Net, 224 px: ``experiments/base.yaml`` +
``paper/paper.yaml`` + ``paper/full.yaml``) and the CPU recipe's (+ ``paper/cpu.yaml``: ResNet-18, 96 px, decoder
``[128, 64, 32, 16, 8]``), on the CPU: eager fp32, eager channels_last, ONNX Runtime fp32, ONNX Runtime int8
(``skinfusion export --quantize int8``'s settings, calibrated on synthetic lesions: speed does not depend on the
weights), with two or more threads the same int8 file split over one session a thread (``OnnxNet(path,
sessions=N)``: each image of a batch on one thread) and bf16 autocast where the CPU has AVX-512 BF16 or AMX ("not
available" otherwise). Images/s at batch 1 and 16 are timed in one process, alternated over ``--rounds`` (A B C, C B
A...), as ratios to eager fp32 of the same round; peak RSS (``VmHWM``) comes from a fresh process per variant that
loads it and runs one batch of 16 (in one process every variant's weights and the allocator's retained memory would
blur together); the CPU flags from ``/proc/cpuinfo`` are printed, and each row names the CPU features its kernels
use (PyTorch's dispatch level as PyTorch reports it; for ONNX Runtime the best MLAS kernels its dispatch has for
those flags). ``--networks cpu`` runs one of the two. ONNX Runtime's threads do not spin while idle (they would take
cores from the next variant) and use ``--threads`` as PyTorch does. On a machine busy with other jobs give
``--threads 1``: two OpenMP threads wait at every operator for each other's time slice (eager ResNet-18 ran 25x
slower with 2 than with 1 on 2 loaded cores).

    python benchmarks/bench_inference.py --int8 --quick --threads 1   # 2 rounds, fewer repeats: minutes
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from _bench import (
    add_malloc_option,
    alternate,
    apply_malloc,
    bench_parser,
    forward_flops,
    machine,
    matmul_flops_per_s,
    median,
    run_json,
    spread,
    sync,
)

from skinfusion.io import InferenceSettings
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
    for key in ("encoder", "image_size", "batch_size", "iters", "device", "threads", "malloc"):
        value = getattr(args, key)
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return run_json(command, variant)


# ------------------------------------------------------------------------------------------------ --int8 comparison

REPO = Path(__file__).resolve().parents[1]
#: The networks ``--int8`` compares (``--networks``): name -> (title, experiment files, the last wins, as
#: ``skinfusion fit --config`` reads them).
RECIPES = {
    "paper": ("paper (ResNet-50 U-Net, 224 px)", ("base.yaml", "paper/paper.yaml", "paper/full.yaml")),
    "cpu": (
        "CPU recipe (ResNet-18, 96 px)",
        ("base.yaml", "paper/paper.yaml", "paper/full.yaml", "paper/cpu.yaml"),
    ),
}
#: /proc/cpuinfo flags that decide which kernels PyTorch and ONNX Runtime can use.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def recipe_net(files: tuple[str, ...]) -> tuple[SkinFusionNet, InferenceSettings]:
    """The network (random weights) and inference record of ``skinfusion fit --config FILE...``, from the YAML files."""
    import yaml

    from skinfusion.data.dataset import META_DIM

    init_args: dict = {}
    data: dict = {}
    for name in files:
        config = yaml.safe_load((REPO / "experiments" / name).read_text()) or {}
        init_args.update(((config.get("model") or {}).get("net") or {}).get("init_args") or {})
        data.update(config.get("data") or {})
    init_args["pretrained"] = False
    init_args["meta_dim"] = META_DIM if data.get("use_metadata") else 0  # linked from the DataModule by the CLI
    torch.manual_seed(0)
    net = SkinFusionNet(**init_args).eval()
    inputs = {k: data[k] for k in ("image_size", "normalization") if data.get(k) is not None}
    return net, InferenceSettings(net.config, InferenceSettings.defaults_for(net).class_names, **inputs)


INT8_VARIANTS = ("eager fp32", "eager channels_last", "ONNX Runtime fp32", "ONNX Runtime int8", "eager bf16 autocast")


def _prepare_files(net: SkinFusionNet, settings: InferenceSettings, workdir: Path, calibration: int) -> None:
    """``fp32.onnx``, ``int8.onnx`` (``export --quantize int8``'s defaults: :func:`quantize_int8`'s, without the
    accuracy guard, which random weights would not pass meaningfully) and the weights, in ``workdir``."""
    from skinfusion.data.synthetic import write_synthetic
    from skinfusion.inference.export import export_onnx
    from skinfusion.inference.quantize import quantize_int8

    torch.save(net.state_dict(), workdir / "net.pth")
    start = time.perf_counter()
    export_onnx(net, workdir / "fp32.onnx", settings)
    exported = time.perf_counter() - start
    records = write_synthetic(workdir / "calibration", n=calibration, seed=0, size=max(settings.image_size, 64))
    start = time.perf_counter()
    quantize_int8(workdir / "fp32.onnx", workdir / "int8.onnx", records)
    print(
        f"#   exported fp32 ONNX in {exported:.0f} s; int8 calibrated on {len(records)} synthetic lesions and "
        f"written in {time.perf_counter() - start:.0f} s"
    )


def _int8_runner(variant: str, net: SkinFusionNet | None, workdir: Path):
    """A callable ``(image, meta) -> (mask_logits, class_logits)`` for one ``--int8`` variant."""
    if variant.startswith("ONNX Runtime int8,"):  # "ONNX Runtime int8, N sessions": OnnxNet's batch split
        import onnxruntime as ort

        from skinfusion.inference.onnxnet import OnnxNet

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions = int(variant.split(", ")[1].split()[0])
        onnx_net = OnnxNet(
            workdir / "int8.onnx", threads=torch.get_num_threads(), session_options=options, sessions=sessions
        )

        def run_sessions(image, meta):
            output = onnx_net(image, meta if onnx_net.meta_dim else None)
            return output.mask_logits, output.class_logits

        return run_sessions
    if variant.startswith("ONNX Runtime"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        # idle ONNX Runtime threads otherwise spin after each run, taking cores from whatever runs next
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        path = workdir / ("int8.onnx" if variant.endswith("int8") else "fp32.onnx")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        has_meta = any(i.name == "meta" for i in session.get_inputs())

        def run_onnx(image, meta):
            feed = {"image": image.numpy()} | ({"meta": meta.numpy()} if has_meta else {})
            return tuple(torch.from_numpy(o) for o in session.run(["mask_logits", "class_logits"], feed))

        return run_onnx
    memory_format = torch.channels_last if "channels_last" in variant else torch.contiguous_format
    module = net.to(memory_format=memory_format)
    bf16 = "bf16" in variant

    def run_torch(image, meta):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = module(image.contiguous(memory_format=memory_format), meta)
        return output.mask_logits.float(), output.class_logits.float()

    return run_torch


def _int8_features(variant: str, flags: set[str]) -> str:
    """The CPU features ``variant``'s kernels use on a CPU with ``flags``: PyTorch's dispatch level (as PyTorch
    reports it), ONNX Runtime's MLAS kernels (the best its dispatch has for the flags)."""
    if "bf16" in variant:
        return "oneDNN " + ("AMX-BF16" if "amx_bf16" in flags else "AVX-512 BF16")
    if not variant.startswith("ONNX"):
        return f"ATen {torch.backends.cpu.get_cpu_capability()}, oneDNN convolutions"
    if "int8" in variant:
        for flag, name in (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"), ("avx_vnni", "AVX-VNNI")):
            if flag in flags:
                return f"MLAS u8s8 {name}"
        return "MLAS u8s8 AVX2 (no VNNI: int16 pair sums, 7-bit weights)"
    return "MLAS " + ("AVX-512F" if "avx512f" in flags else "AVX2 + FMA" if "fma" in flags else "SSE")


def _int8_inputs(batch_size: int, image_size: int, meta_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch_size)
    image = torch.randn(batch_size, 3, image_size, image_size, generator=generator)
    return image, torch.rand(batch_size, meta_dim, generator=generator)


def memory_worker(args: argparse.Namespace) -> None:
    """One ``--int8`` variant alone in this fresh process: load it, run one batch of 16, print ``VmHWM`` (MB)."""
    warnings.filterwarnings("ignore")
    workdir = Path(args.workdir)
    net, settings = recipe_net(RECIPES[args.recipe][1])
    inputs = _int8_inputs(16, settings.image_size, net.meta_dim)
    if args.memory_worker != "baseline":
        if not args.memory_worker.startswith("ONNX"):
            net.load_state_dict(torch.load(workdir / "net.pth", weights_only=True))
        else:
            net = None  # an ONNX Runtime process holds the file's weights only
        _int8_runner(args.memory_worker, net, workdir)(*inputs)
    print(json.dumps({"peak_mb": peak_rss_mb()}))


def _peak_in_own_process(variant: str, recipe: str, workdir: Path, args: argparse.Namespace) -> float:
    command = [sys.executable, __file__, "--memory-worker", variant, "--recipe", recipe]
    command += ["--workdir", str(workdir), "--malloc", args.malloc, "--threads", str(torch.get_num_threads())]
    return run_json(command, variant)["peak_mb"]


def _time(run, inputs, repeats: int) -> float:
    """Images/s of ``repeats`` calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        run(*inputs)
    return inputs[0].shape[0] * repeats / (time.perf_counter() - start)


def int8_main(args: argparse.Namespace) -> None:
    """``--int8``: the comparison described in the module docstring."""
    warnings.filterwarnings("ignore")
    flags = cpu_flags()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    print(f"# {machine(torch.device('cpu'))}; load average {load:.1f} on {os.cpu_count()} cores before the run")
    print(
        f"# CPU flags: {', '.join(f for f in CPU_FLAGS if f in flags) or 'none'} "
        f"(absent: {', '.join(f for f in CPU_FLAGS if f not in flags) or 'none'}); "
        f"PyTorch kernels: {torch.backends.cpu.get_cpu_capability()}"
    )
    bf16 = bool({"avx512_bf16", "amx_bf16"} & flags)
    listed = list(INT8_VARIANTS)
    if torch.get_num_threads() > 1:  # the batch split over one session a thread (OnnxNet(sessions=N))
        listed.insert(listed.index("ONNX Runtime int8") + 1, f"ONNX Runtime int8, {torch.get_num_threads()} sessions")
    variants = [v for v in listed if bf16 or "bf16" not in v]
    repeats = {1: 3 if args.quick else 10, 16: 1 if args.quick else 3}
    for recipe in args.networks.split(","):
        title, files = RECIPES[recipe]
        net, settings = recipe_net(files)
        print(
            f"\n## {title}: {' + '.join(files)}; {settings.image_size} px, {settings.normalization} normalisation; "
            f"meta_dim {net.meta_dim}; {torch.get_num_threads()} threads",
            flush=True,
        )
        with tempfile.TemporaryDirectory() as tmp:
            workdir = Path(tmp)
            _prepare_files(net, settings, workdir, args.calibration)
            runners = {v: _int8_runner(v, copy.deepcopy(net), workdir) for v in variants}
            inputs = {b: _int8_inputs(b, settings.image_size, net.meta_dim) for b in (1, 16)}
            reference = runners["eager fp32"](*inputs[16])
            diffs = {}
            for name, run in runners.items():  # also the warm-up: first calls at both batch sizes
                run(*inputs[1])
                mask, logits = run(*inputs[16])
                diffs[name] = (
                    float((mask.sigmoid() - reference[0].sigmoid()).abs().max()),
                    float((logits.softmax(-1) - reference[1].softmax(-1)).abs().max()),
                )
            timed = {
                f"{name}, batch {b}": functools.partial(_time, run, inputs[b], repeats[b])
                for b in (1, 16)
                for name, run in runners.items()
            }
            rates = alternate(timed, args.rounds, log=lambda line: print(f"#{line} img/s", flush=True))
            del runners, timed
            peaks = {v: _peak_in_own_process(v, recipe, workdir, args) for v in ["baseline", *variants]}
        print(
            f"\n| variant | img/s batch 1 | vs eager fp32 | img/s batch 16 | vs eager fp32 | peak RSS, own process "
            f"(MB; bare {peaks['baseline']:.0f}) | max diff vs eager fp32: mask prob, class prob | CPU features used |"
        )
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for name in listed:
            if name not in variants:
                print(f"| {name} | not available: no avx512_bf16 / amx_bf16 in /proc/cpuinfo | | | | | | |")
                continue
            cells = []
            for b in (1, 16):
                key, eager = f"{name}, batch {b}", f"eager fp32, batch {b}"
                ratios = [x / e for x, e in zip(rates[key], rates[eager], strict=True)]
                cells += [spread(rates[key]), f"{median(ratios):.2f}"]
            cells += [f"{peaks[name]:.0f}", f"{diffs[name][0]:.1e}, {diffs[name][1]:.1e}", _int8_features(name, flags)]
            print(f"| {name} | {' | '.join(cells)} |")


def main() -> None:
    parser = bench_parser(__doc__, "resnet50", 224, 4, rounds=2)
    parser.add_argument("--iters", type=int, default=3, help="timed batches (and >= 3 single images) per run")
    parser.add_argument("--variants", default="eager,eager+cl,eager+bf16,torchscript,onnxruntime")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch / onnxruntime threads")
    parser.add_argument("--int8", action="store_true", help="the int8 comparison (module docstring)")
    parser.add_argument("--quick", action="store_true", help="--int8: fewer timed calls per round")
    parser.add_argument("--calibration", type=int, default=16, help="--int8: synthetic calibration images")
    parser.add_argument("--networks", default="paper,cpu", help=f"--int8: networks compared, of {list(RECIPES)}")
    add_malloc_option(parser, "tuned")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    apply_malloc(args)  # tuned: as `skinfusion predict` runs
    if args.memory_worker:
        memory_worker(args)
        return
    if args.int8:
        int8_main(args)
        return
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

        settings = InferenceSettings(net.config, InferenceSettings.defaults_for(net).class_names, args.image_size)

        for kind, path, export in (
            ("onnxruntime", "net.onnx", export_onnx),
            ("torchscript", "net.pt", export_torchscript),
        ):
            if any(v.split("+")[0] == kind for v in variants):
                start = time.perf_counter()
                export(net, workdir / path, settings)
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
