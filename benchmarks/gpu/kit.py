"""The GPU kit's steps. Run it through ``benchmarks/gpu/run.sh OUTDIR [--smoke]`` (see README.md beside this).

Steps, cheapest and most informative first, each in its own process with its own time limit, each writing its
results as soon as it has them (a run killed at the limit still returns what it finished):

``env``       nvidia-smi, torch / CUDA / cuDNN versions, the packages' versions and requirement check, and the
              bf16 matmul ceiling (8192^3, random data) measured in that process                     -> env.txt
``tests``     ``pytest -m cuda`` over the test files that use the marker                             -> tests.txt
``train``     training images/s, share of the bf16 ceiling and peak memory of the paper's full network
              (experiments/paper/full.yaml: ResNet-50, 224 px) in fp32, bf16, bf16 + channels_last, against the
              plain PyTorch loop of ``benchmarks/bench_training.py`` (``PlainNet``, ``plain_loss``) in fp32 and
              bf16 + channels_last, and skinfusion on the plain loop's network (``samenet``)
``infer``     inference images/s at batch 1 and 64 (``benchmarks/bench_inference.py``'s runners)
``loader``    images/s of the training DataLoader from the prepared uint8 cache for 1, 2, 4, ... workers
``realdata``  the paper's full system trained on the carried cache (bf16, channels_last) for 45 s, or less
              when less is left, then ``skinfusion evaluate`` on its test split                       -> realdata.txt
``compile``   the fastest eager option set with ``torch.compile``: last, as its compile time is the least
              predictable (it gets all the time left; ``run.sh OUTDIR --steps compile`` reruns it alone)

Every measurement is a line of ``results.jsonl`` and a table row of ``results.md``; ``run.sh`` tees the log to
``log.txt``. Nothing else is written under OUTDIR (the device returns at most 8 files). ``--smoke`` runs the same
steps on the CPU with timm's ``test_resnet`` at 32 px (``torch.compile`` with the ``eager`` backend: graph
capture without code generation) on a synthetic cache, and the CUDA tests as their CPU dry run
(``SKINFUSION_CUDA_TESTS_ON_CPU=1``), so that CI keeps the kit and those tests working.

Steps run in forked children of this process (the heavy imports are paid once) or, with ``KIT_LAUNCH=spawn``
(the default on the GPU: a fresh CUDA context and interpreter per step), in fresh ``python kit.py --step``
processes. The parent never touches CUDA, so forked children may.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() without a CUDA context

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))  # benchmarks/: _bench, bench_training, bench_inference

#: Everything written under OUTDIR (run.sh writes log.txt).
OUTPUTS = ("log.txt", "env.txt", "tests.txt", "results.md", "results.jsonl", "realdata.txt")
#: The issue's training throughput goal for the full network at 224 px with the best options.
GOAL_IMAGES_PER_S = 1500
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STEPS = ("env", "tests", "train", "infer", "loader", "realdata", "compile")
#: The paper's full system: its shared setting, then its switches (experiments/paper/).
PAPER_FULL = ("paper.yaml", "full.yaml")
#: The ISIC ranking metrics (Task 1 thresholded Jaccard, Task 3 balanced accuracy) and companions, as named by evaluate.
HEADLINE_METRICS = (
    "task1/threshold_jaccard",
    "task1/jaccard",
    "task1/dice",
    "task3/balanced_accuracy",
    "task3/macro/auc",
)


#: Datasheet dense bf16 tensor-core peaks (TFLOP/s, no sparsity) by GPU name, most specific first: the H200 has the
#: H100 SXM's compute (its difference is memory: 141 GB HBM3e against 80 GB HBM3). Reported beside the measured
#: ceiling; the tables' shares are of the measured ceiling.
DATASHEET_BF16_TFLOPS = (("H200", 989.0), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.0))


def datasheet_bf16_tflops(name: str) -> float | None:
    """The datasheet bf16 dense peak of the GPU called ``name`` (e.g. "NVIDIA H100 80GB HBM3"); None: not listed."""
    return next((peak for key, peak in DATASHEET_BF16_TFLOPS if key.lower() in name.lower()), None)


@functools.lru_cache(maxsize=1)
def gpu_name_and_memory_gib() -> tuple[str, float] | None:
    """The first GPU's name and memory from ``nvidia-smi`` (no CUDA context: the parent may fork after it)."""
    if not shutil.which("nvidia-smi"):
        return None
    command = ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=True)
        name, mib = done.stdout.splitlines()[0].rsplit(",", 1)
        return name.strip(), float(mib) / 1024
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        return None


def train_batch_for(memory_gib: float | None) -> int:
    """The training benchmark's batch: 128 on an 80 GB H100 (about 78 GiB usable) and a 141 GB H200 alike, so
    that their figures compare; halved on smaller cards (the fp32 variants of the 224 px network need the most)."""
    if memory_gib is None or memory_gib >= 60:
        return 128
    return 64 if memory_gib >= 30 else 32


@dataclass
class Config:
    """What each step does, on the GPU or (``smoke``) on the CPU."""

    out: Path
    smoke: bool
    scratch: Path
    fit_seconds: int = 0  # the real-data fit's max_time, set by the parent from the time left
    device: str = "cuda"
    encoder: str = "resnet50"
    decoder_channels: list[int] | None = None  # None: the configs' (256, 128, 64, 32, 16)
    image_size: int = 224
    batch_size: int = 128
    warmup: int = 5
    iters: int = 15
    matmul_n: int = 8192
    infer_batches: tuple[int, ...] = (1, 64)
    infer_iters: int = 20
    train_variants: tuple[str, ...] = (  # each plain loop before the skinfusion variants compared with it
        "plain",
        "skinfusion",
        "skinfusion+bf16",
        "plain+bf16+cl",
        "skinfusion+bf16+cl",
        "skinfusion+bf16+cl+samenet",
    )
    compile_variant: str = "skinfusion+bf16+cl+compile"
    compile_options: bool | dict = True
    workers: tuple[int, ...] = (1, 2, 4, 6, 8, 12, 16)
    loader_batch: int = 64
    cache: Path | None = REPO / ".gpu-cache" / "manifest.csv"
    synthetic: tuple[int, int] = (2000, 128)  # images, px: the stand-in when no cache was carried
    realdata_batch: int = 64
    realdata_args: tuple[str, ...] = ()
    budget_s: float = 470.0  # the whole kit, from run.sh's start: the device call's limit is 600 s
    caps: dict[str, float] = field(
        default_factory=lambda: {
            "env": 45,
            "tests": 150,
            "train": 100,
            "infer": 45,
            "loader": 45,
            "realdata": 105,  # a 45 s fit + its reserve
            "compile": 180,
        }
    )
    realdata_reserve_s: float = 60.0  # realdata's time beyond the fit: start, setup, evaluate
    min_fit_s: float = 30.0  # skip the real-data run when less is left for its fit
    compile_min_s: float = 60.0  # the real-data run leaves at least this much for the compile step


def make_config(out: Path, smoke: bool, scratch: Path, fit_seconds: int = 0) -> Config:
    if not smoke:
        gpu = gpu_name_and_memory_gib()
        batch = train_batch_for(gpu[1] if gpu else None)
        return Config(out=out, smoke=False, scratch=scratch, fit_seconds=fit_seconds, batch_size=batch)
    return Config(
        out=out,
        smoke=True,
        scratch=scratch,
        fit_seconds=fit_seconds,
        device="cpu",
        encoder="test_resnet",
        decoder_channels=[16, 16, 8, 8, 8],
        image_size=32,
        batch_size=8,
        warmup=1,
        iters=2,
        matmul_n=256,
        infer_batches=(1, 8),
        infer_iters=2,
        compile_options={"backend": "eager"},
        workers=(1, 2),
        loader_batch=8,
        cache=None,
        synthetic=(64, 48),
        realdata_batch=8,
        realdata_args=(
            "--model.net.init_args.encoder=test_resnet",
            "--model.net.init_args.decoder_channels=[16,16,8,8,8]",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
        ),
        # 70 s measured on the 2-core development VM beside other jobs (load 10), ~500 s when they ran heavier:
        # the limits only stop a hung step.
        budget_s=900.0,
        caps=dict.fromkeys(STEPS, 240.0),
        realdata_reserve_s=30.0,
        min_fit_s=10.0,
        compile_min_s=0.0,
    )


# ---------------------------------------------------------------------------------------------- writing results


def record(cfg: Config, **entry) -> None:
    """Append one JSON line to results.jsonl, on disk at once."""
    with open(cfg.out / "results.jsonl", "a") as f:
        f.write(json.dumps(entry, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def markdown(cfg: Config, text: str) -> None:
    """Append to results.md, on disk at once."""
    with open(cfg.out / "results.md", "a") as f:
        f.write(text if text.endswith("\n") else text + "\n")
        f.flush()
        os.fsync(f.fileno())


def results(cfg: Config) -> list[dict]:
    path = cfg.out / "results.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@contextlib.contextmanager
def output_to(path: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so children's too) to ``path``."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for descriptor in (fd, *saved):
            os.close(descriptor)


def peak_memory_mib(device) -> float:
    """Peak GPU memory allocated since the last reset; on the CPU the process's peak RSS (``VmHWM``)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    from bench_inference import peak_rss_mb

    return peak_rss_mb()


def reset_peak_memory(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bf16_ceiling(cfg: Config, device) -> float:
    """FLOP/s of a bf16 matmul of side ``matmul_n`` on random data, best of 10, in this process."""
    import torch
    from _bench import matmul_flops_per_s

    return matmul_flops_per_s(device, n=cfg.matmul_n, repeats=10, dtype=torch.bfloat16)


# ---------------------------------------------------------------------------------------------- step: env


def step_env(cfg: Config) -> None:
    from importlib import metadata

    import torch
    from _bench import cpu_model

    lines = [f"# skinfusion GPU kit ({'smoke, CPU' if cfg.smoke else 'GPU'}), {time.strftime('%Y-%m-%d %H:%M:%S %Z')}"]
    if shutil.which("nvidia-smi"):
        for command in (
            ["nvidia-smi"],
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.draw,power.limit,"
                "temperature.gpu,utilization.gpu",
                "--format=csv",
            ],
        ):
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
            lines += [f"$ {' '.join(command)}", done.stdout.rstrip(), done.stderr.rstrip()]
    else:
        lines.append("nvidia-smi: not found")
    device = torch.device(cfg.device)
    lines += [
        f"python {sys.version.split()[0]} ({sys.executable}), {os.uname().sysname} {os.uname().machine}",
        f"CPU: {cpu_model()}, {os.cpu_count()} logical CPUs, {len(os.sched_getaffinity(0))} usable",
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}",
        f"cuda available: {torch.cuda.is_available()}; TF32: cudnn {torch.backends.cudnn.allow_tf32}, matmul "
        f"{torch.backends.cuda.matmul.allow_tf32} (float32 matmul precision {torch.get_float32_matmul_precision()})",
    ]
    entry = {"kind": "env", "torch": torch.__version__, "cuda": torch.version.cuda, "device": cfg.device}
    device_line = "CPU (smoke)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        device_line = (
            f"{props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.1f} GiB, {props.multi_processor_count} SMs"
        )
        lines.append(f"device: {device_line}")
        entry["device_name"] = props.name
        entry["datasheet_bf16_tflops"] = datasheet_bf16_tflops(props.name)
    names = [
        *("torch", "pytorch-lightning", "torchmetrics", "timm", "segmentation-models-pytorch", "albumentations"),
        *("albucore", "wandb", "jsonargparse", "numpy", "opencv-python-headless", "pandas", "pillow", "onnx"),
        *("onnxruntime", "onnxscript", "pytest", "triton"),
    ]
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    lines.append("packages: " + ", ".join(f"{n} {v or 'MISSING'}" for n, v in versions.items()))
    check = subprocess.run(
        [sys.executable, str(HERE / "check_wheels.py"), "--installed"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines += [check.stdout.rstrip(), check.stderr.rstrip()]
    (cfg.out / "env.txt").write_text("\n".join(line for line in lines if line) + "\n")
    ceiling = bf16_ceiling(cfg, device)
    text = f"bf16 matmul ceiling: {ceiling / 1e12:.1f} TFLOP/s ({cfg.matmul_n}^3, random inputs, best of 10)"
    if entry.get("datasheet_bf16_tflops"):
        peak = entry["datasheet_bf16_tflops"]
        text += f", {ceiling / 1e12 / peak * 100:.0f}% of the datasheet's {peak:.0f} TFLOP/s (bf16 dense)"
    with open(cfg.out / "env.txt", "a") as f:
        f.write(text + "\n")
    entry.update(bf16_tflops=ceiling / 1e12, packages=versions, requirements_ok=check.returncode == 0)
    record(cfg, **entry)
    markdown(cfg, f"\n## Environment\n\n{device_line}; torch {torch.__version__}, CUDA {torch.version.cuda}; {text}\n")


# ---------------------------------------------------------------------------------------------- step: tests


def cuda_test_files() -> list[str]:
    """The test files that use the ``cuda`` marker (so ``-m cuda`` needs to collect only those)."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())


def step_tests(cfg: Config) -> int:
    import pytest

    class Outcomes:
        def __init__(self) -> None:
            self.counts: dict[str, int] = {}
            self.failed: list[str] = []

        def pytest_runtest_logreport(self, report) -> None:
            if report.when == "call" or report.outcome != "passed":
                self.counts[report.outcome] = self.counts.get(report.outcome, 0) + 1
                if report.outcome == "failed":
                    self.failed.append(report.nodeid)

    outcomes = Outcomes()
    files = cuda_test_files()
    os.chdir(REPO)
    select = []
    if cfg.smoke:  # the tests' own logic on the CPU (their CUDA-only assertions left out), so drift shows before a GPU
        os.environ["SKINFUSION_CUDA_TESTS_ON_CPU"] = "1"
        # ...but not channels_last's rounding bound: single-threaded oneDNN NHWC kernels miss the GPU's 1e-5 (seen
        # 1.4e-2 on an attention conv), nor torch.compile (inductor's CPU code generation takes 150-250 s on 2
        # cores, past the step's limit): test_speed_options owns both checks on the CPU.
        select = ["-k", "not channels_last and not compile"]
    with output_to(cfg.out / "tests.txt"):
        code = pytest.main(["-m", "cuda", "-rA", "-p", "no:cacheprovider", *select, *files], [outcomes])
    record(cfg, kind="tests", exit_code=int(code), files=files, **outcomes.counts, failed_tests=outcomes.failed)
    summary = ", ".join(f"{n} {k}" for k, n in sorted(outcomes.counts.items())) or "no test ran"
    markdown(
        cfg,
        f"\n## CUDA tests (`pytest -m cuda`)\n\n{summary} (exit code {int(code)})"
        + "".join(f"\n* failed: `{name}`" for name in outcomes.failed)
        + "\n",
    )
    return int(code)


# ---------------------------------------------------------------------------------------------- step: train


def paper_net_config(cfg: Config, samenet: bool = False) -> dict:
    """The paper's full network as base.yaml + paper/paper.yaml + paper/full.yaml (experiments/) configure it."""
    import yaml

    config: dict = {}
    for path in (REPO / "experiments" / "base.yaml", *(REPO / "experiments" / "paper" / f for f in PAPER_FULL)):
        config.update(yaml.safe_load(path.read_text())["model"]["net"]["init_args"])
    config.update(encoder=cfg.encoder, pretrained=False)  # no hub on the GPU machine
    if cfg.decoder_channels:
        config["decoder_channels"] = list(cfg.decoder_channels)
    if samenet:  # bench_training's network: the plain loop's, without attention and fusion
        config.update(attention=None, fusion="none")
    return config


def make_batches(cfg: Config, device, count: int = 4) -> list[dict]:
    """uint8 batches as the loader delivers them with ``normalize_on_device`` (pinned on a GPU)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    b, s = cfg.batch_size, cfg.image_size
    batches = []
    for _ in range(count):
        batch = {
            "image": torch.randint(0, 256, (b, 3, s, s), generator=generator, dtype=torch.uint8),
            "mask": (torch.rand(b, 1, s, s, generator=generator) > 0.5).to(torch.uint8),
            "has_mask": torch.rand(b, generator=generator) > 0.2,
            "label": torch.randint(-1, 7, (b,), generator=generator),
        }
        if device.type == "cuda":
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batch["id"] = [f"synthetic_{i}" for i in range(b)]
        batches.append(batch)
    return batches


def in_memory_datamodule(batches: list[dict], steps: int):
    """A SkinFusionDataModule whose training loader repeats ``batches``: the real uint8 -> device path, no decoding."""
    from torch.utils.data import DataLoader, Dataset

    from skinfusion import SkinFusionDataModule

    class Repeat(Dataset):
        def __len__(self) -> int:
            return steps

        def __getitem__(self, index: int) -> dict:
            return dict(batches[index % len(batches)])  # the hooks replace entries: keep the originals uint8

    class InMemory(SkinFusionDataModule):
        def prepare_data(self) -> None:
            pass

        def setup(self, stage: str | None = None) -> None:
            pass

        def train_dataloader(self) -> DataLoader:
            return DataLoader(Repeat(), batch_size=None, shuffle=False, num_workers=0)

    return InMemory(
        batch_size=len(batches[0]["id"]),
        num_workers=0,
        pin_memory=False,  # already pinned
        normalization="imagenet",
        normalize_on_device=True,
    )


def train_flops_per_image(net, cfg: Config, device) -> float:
    """FLOPs of one training step per image (forward + backward), counted by ``torch.utils.flop_counter``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    net = net.to(device).train()
    image = torch.rand(2, 3, cfg.image_size, cfg.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        output = net(image)
        sum(o.float().mean() for o in (output[0], output[1]) if o is not None).backward()
    return counter.get_total_flops() / 2


def run_plain(cfg: Config, options: set[str], batches: list[dict], device, steps: int):
    """``bench_training``'s hand-written loop (PlainNet, plain_loss) on the same uint8 batches, PyTorch's AdamW."""
    import torch
    from _bench import sync
    from bench_training import PlainNet, plain_loss

    torch.manual_seed(0)
    net = PlainNet(cfg.encoder, list(cfg.decoder_channels or (256, 128, 64, 32, 16))).to(device).train()
    memory_format = torch.channels_last if "cl" in options else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)  # PyTorch's default (foreach)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    starts, ends = [], []
    for step in range(steps):
        starts.append(time.perf_counter())
        batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batches[step % 4].items()}
        image = ((batch["image"].float() / 255 - mean) / std).contiguous(memory_format=memory_format)
        batch["mask"] = batch["mask"].float()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled="bf16" in options):
            mask_logits, class_logits = net(image)
        plain_loss(mask_logits, class_logits, batch).backward()
        optimizer.step()
        sync(device)
        ends.append(time.perf_counter())
    return starts, ends, PlainNet(cfg.encoder, list(cfg.decoder_channels or (256, 128, 64, 32, 16)))


def run_skinfusion(cfg: Config, options: set[str], batches: list[dict], device, steps: int):
    """A real ``pl.Trainer`` fit of SkinFusionModule(paper network) with the options, on the in-memory batches."""
    import torch
    from bench_training import StepTimer, bench_trainer

    from skinfusion import SkinFusionModule, SkinFusionNet

    net_config = paper_net_config(cfg, samenet="samenet" in options)
    torch.manual_seed(0)
    module = SkinFusionModule(
        SkinFusionNet(**net_config),
        channels_last="cl" in options,
        compile=cfg.compile_options if "compile" in options else False,
    )
    timer = StepTimer(device)
    precision = "bf16-mixed" if "bf16" in options else "32-true"
    trainer = bench_trainer(device, steps, [timer], precision)
    trainer.fit(module, datamodule=in_memory_datamodule(batches, steps))
    return timer.starts, timer.ends, SkinFusionNet(**net_config)


def train_variants(cfg: Config, variants: tuple[str, ...], title: str) -> None:
    import torch
    from bench_training import step_stats

    device = torch.device(cfg.device)
    ceiling = bf16_ceiling(cfg, device)
    batches = make_batches(cfg, device)
    markdown(
        cfg,
        f"\n## {title}: {cfg.encoder}, {cfg.image_size} px, batch {cfg.batch_size}, {cfg.device}\n\n"
        f"Median of {cfg.iters} steps after {cfg.warmup} warm-up steps (+3 with compile); uint8 batches in memory, "
        "copied and normalised on the device each step. bf16 ceiling measured in the same process: "
        f"{ceiling / 1e12:.1f} TFLOP/s.\n\n"
        "| variant | network | train img/s | vs plain loop, same precision | GFLOP/img (fwd+bwd) "
        "| of bf16 ceiling | peak memory (MiB) | first step (s) |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    )
    flops: dict[str, float] = {}
    for name in variants:
        kind, *rest = name.split("+")
        options = set(rest)
        warmup = cfg.warmup + (3 if "compile" in options else 0)
        steps = warmup + cfg.iters + 1
        reset_peak_memory(device)
        start = time.perf_counter()
        runner = run_plain if kind == "plain" else run_skinfusion
        starts, ends, fresh_net = runner(cfg, options, batches, device, steps)
        wall = time.perf_counter() - start
        rate, wait = step_stats(starts, ends, warmup, cfg.batch_size)
        peak = peak_memory_mib(device)
        network = "plain loop's" if kind == "plain" or "samenet" in options else "paper full"
        if network not in flops:
            flops[network] = train_flops_per_image(fresh_net, cfg, device)
        del fresh_net
        same = "bf16" in options, "cl" in options
        reference = next(
            (
                r["images_per_s"]
                for r in results(cfg)
                if r.get("kind") == "train" and r["variant"].startswith("plain") and (r["bf16"], r["cl"]) == same
            ),
            None,
        )
        entry = {
            "kind": "train",
            "variant": name,
            "network": network,
            "bf16": same[0],
            "cl": same[1],
            "compile": "compile" in options,
            "images_per_s": rate,
            "data_wait": wait,
            "flops_per_image": flops[network],
            "fraction_of_bf16_ceiling": rate * flops[network] / ceiling,
            "bf16_ceiling_flops": ceiling,
            "peak_mib": peak,
            "first_step_s": ends[0] - starts[0],
            "wall_s": wall,
            "vs_plain": rate / reference if reference else None,
            "batch_size": cfg.batch_size,
            "image_size": cfg.image_size,
            "encoder": cfg.encoder,
        }
        record(cfg, **entry)
        ratio = f"{entry['vs_plain']:.2f}" if entry["vs_plain"] else "-"
        markdown(
            cfg,
            f"| {name} | {network} | {rate:.1f} | {ratio} | {flops[network] / 1e9:.2f} "
            f"| {entry['fraction_of_bf16_ceiling'] * 100:.1f}% | {peak:.0f} | {entry['first_step_s']:.1f} |",
        )
        print(f"  train {name:<32} {rate:9.1f} img/s  peak {peak:.0f} MiB  ({wall:.1f} s)", flush=True)
        gc.collect()


def step_train(cfg: Config) -> None:
    train_variants(cfg, cfg.train_variants, "Training throughput")


def step_compile(cfg: Config) -> None:
    train_variants(cfg, (cfg.compile_variant,), "Training throughput with torch.compile")


# ---------------------------------------------------------------------------------------------- step: infer


def step_infer(cfg: Config) -> None:
    import torch
    from _bench import forward_flops, median, sync
    from bench_inference import _inputs, build_net, make_runner

    device = torch.device(cfg.device)
    args = argparse.Namespace(encoder=cfg.encoder, image_size=cfg.image_size)
    workdir = cfg.scratch / "infer"
    workdir.mkdir(parents=True, exist_ok=True)
    net = build_net(args)
    torch.save(net.state_dict(), workdir / "net.pth")
    flops = forward_flops(net, torch.rand(1, 3, cfg.image_size, cfg.image_size))
    del net
    ceiling = bf16_ceiling(cfg, device)
    markdown(
        cfg,
        f"\n## Inference: bench_inference's network (default config: {cfg.encoder}, CBAM on the skips, mask_pool), "
        f"{cfg.image_size} px, {cfg.device}\n\n| variant | batch | img/s | ms per batch | GFLOP/img (fwd) "
        "| of bf16 ceiling | peak memory (MiB) |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    )
    for variant in ("eager", "eager+cl+bf16"):
        reset_peak_memory(device)
        run = make_runner(variant, args, workdir, device)
        for batch_size in cfg.infer_batches:
            image = _inputs(args, batch_size, device)
            for _ in range(3):
                run(image)
            sync(device)
            times = []
            for _ in range(cfg.infer_iters):
                start = time.perf_counter()
                run(image)
                sync(device)
                times.append(time.perf_counter() - start)
            seconds = median(times)
            rate = batch_size / seconds
            peak = peak_memory_mib(device)
            record(
                cfg,
                kind="infer",
                variant=variant,
                batch_size=batch_size,
                images_per_s=rate,
                ms_per_batch=seconds * 1000,
                flops_per_image=flops,
                fraction_of_bf16_ceiling=rate * flops / ceiling,
                peak_mib=peak,
                encoder=cfg.encoder,
                image_size=cfg.image_size,
            )
            markdown(
                cfg,
                f"| {variant} | {batch_size} | {rate:.1f} | {seconds * 1000:.2f} | {flops / 1e9:.2f} "
                f"| {rate * flops / ceiling * 100:.1f}% | {peak:.0f} |",
            )
            print(f"  infer {variant:<16} batch {batch_size:3d} {rate:9.1f} img/s", flush=True)
        del run


# ---------------------------------------------------------------------------------------------- step: loader


def ensure_cache(cfg: Config) -> tuple[Path, str]:
    """The carried cache's manifest, else a synthetic prepared cache made here; and a line saying which."""
    if cfg.cache is not None and cfg.cache.is_file():
        return cfg.cache, f"carried cache {cfg.cache.parent.name}/ (real ISIC 2018 images, benchmarks/gpu/README.md)"
    from skinfusion.cli import main

    n, size = cfg.synthetic
    out = cfg.scratch / "synthetic-cache"
    if not (out / "manifest.csv").is_file():
        source = f"synthetic:{cfg.scratch / 'synthetic'}:n={n},size={size}"
        main(["prepare", "--source", source, "--out", str(out), "--size", str(size), "--no-progress"])
    why = "smoke" if cfg.smoke else f"no carried cache at {cfg.cache}"
    return out / "manifest.csv", f"synthetic cache of {n} images at {size} px ({why})"


def fastest_training(cfg: Config, eager_only: bool = False) -> dict | None:
    rows = [r for r in results(cfg) if r.get("kind") == "train" and not (eager_only and r.get("compile"))]
    return max(rows, key=lambda r: r["images_per_s"], default=None)


def step_loader(cfg: Config) -> None:
    import torch

    from skinfusion import SkinFusionDataModule

    manifest, what = ensure_cache(cfg)
    fastest = fastest_training(cfg)
    needed = fastest["images_per_s"] if fastest else GOAL_IMAGES_PER_S
    markdown(
        cfg,
        f"\n## Loader: training DataLoader from the {what}, {cfg.image_size} px output, uint8 "
        f"(`normalize_on_device`), batch {cfg.loader_batch}, {len(os.sched_getaffinity(0))} CPUs\n\n"
        f"To feed: {needed:.0f} img/s ({fastest['variant'] if fastest else 'the goal'}).\n\n"
        "| workers | img/s | vs needed | first batch (s) |\n| ---: | ---: | ---: | ---: |",
    )
    for workers in [w for w in cfg.workers if w <= len(os.sched_getaffinity(0))] or [1]:
        dm = SkinFusionDataModule(
            manifest=str(manifest),
            image_size=cfg.image_size,
            batch_size=cfg.loader_batch,
            num_workers=workers,
            normalization="unit",
            normalize_on_device=True,
            validate="exists",  # prepare validated every file; reading all headers per worker count costs seconds
        )
        dm.setup("fit")
        loader = dm.train_dataloader()
        start = time.perf_counter()
        iterator = iter(loader)
        skip = workers  # the first batch of every worker comes at once after start-up: not the steady rate
        timed = max(2, min(3 * workers, len(loader) - skip - 1))
        first = None
        for index, batch in zip(range(skip + timed), iterator, strict=False):
            if index == 0:
                first = time.perf_counter() - start
            if index == skip - 1:
                begin, images = time.perf_counter(), 0
            elif index >= skip:
                images += batch["image"].shape[0]
        rate = images / (time.perf_counter() - begin)
        del iterator, loader
        pinned = bool(torch.cuda.is_available())
        record(
            cfg, kind="loader", workers=workers, images_per_s=rate, first_batch_s=first, needed=needed, pinned=pinned
        )
        markdown(cfg, f"| {workers} | {rate:.0f} | {rate / needed:.2f} | {first:.2f} |")
        print(f"  loader {workers:2d} workers {rate:9.1f} img/s", flush=True)
        if rate >= 2 * needed:  # enough, with room for a faster compiled step measured later
            break


def workers_to_feed(cfg: Config, images_per_s: float) -> int | None:
    rows = sorted((r for r in results(cfg) if r.get("kind") == "loader"), key=lambda r: r["workers"])
    return next((r["workers"] for r in rows if r["images_per_s"] >= images_per_s), None)


# ---------------------------------------------------------------------------------------------- step: realdata


def step_realdata(cfg: Config) -> None:
    import torch

    from skinfusion.cli import main

    manifest, what = ensure_cache(cfg)
    work = cfg.scratch / "realdata"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    eager = fastest_training(cfg, eager_only=True)
    workers = workers_to_feed(cfg, eager["images_per_s"]) if eager else None
    workers = workers or (0 if cfg.smoke else min(12, len(os.sched_getaffinity(0))))
    seconds = max(cfg.fit_seconds, 10)
    fit = [
        "fit",
        "--config",
        str(REPO / "experiments" / "base.yaml"),
        *(arg for f in PAPER_FULL for arg in ("--config", str(REPO / "experiments" / "paper" / f))),
        "--model.net.init_args.pretrained=false",  # no hub there; ImageNet weights do not fit in the 64 MiB
        f"--data.manifest={manifest}",
        f"--data.image_size={cfg.image_size}",
        f"--data.batch_size={cfg.realdata_batch}",
        f"--data.num_workers={workers}",
        f"--data.persistent_workers={'true' if workers else 'false'}",  # no worker start-up every epoch
        f"--trainer.accelerator={'gpu' if cfg.device == 'cuda' else 'cpu'}",
        "--trainer.precision=bf16-mixed",
        "--model.channels_last=true",
        f"--trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
        "--trainer.max_epochs=1000",
        "--trainer.enable_progress_bar=false",
        *cfg.realdata_args,
    ]
    with output_to(cfg.out / "realdata.txt"):
        print(f"# real-data run on the {what}\n$ skinfusion {' '.join(fit)}", flush=True)
        start = time.perf_counter()
        main(fit)
        fit_s = time.perf_counter() - start
        checkpoints = sorted(work.glob("runs/skinfusion/version_*/checkpoints"))[-1]
        best = sorted(checkpoints.glob("best-*.ckpt"))
        ckpt = best[-1] if best else checkpoints / "last.ckpt"
        last = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)
        evaluate = ["evaluate", "--truth", str(manifest), "--split", "test", "--ckpt", str(ckpt), "--out", "report"]
        evaluate += ["--device", cfg.device, "--batch-size", "64", "--num-workers", str(min(workers, 8))]
        print(f"$ skinfusion {' '.join(evaluate)}", flush=True)
        start = time.perf_counter()
        main(evaluate)
        evaluate_s = time.perf_counter() - start
        metrics = json.loads((work / "report" / "metrics.json").read_text())
        scores = {k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        print(json.dumps({"test_metrics": scores}, indent=1), flush=True)
    images = int(last["global_step"]) * cfg.realdata_batch
    entry = {
        "kind": "realdata",
        "data": what,
        "fit_s": fit_s,
        "max_time_s": seconds,
        "epochs": int(last["epoch"]) + 1,
        "steps": int(last["global_step"]),
        "images_seen": images,
        "workers": workers,
        "checkpoint": ckpt.name,
        "evaluate_s": evaluate_s,
        "test_metrics": scores,
    }
    record(cfg, **entry)
    shown = {k: scores[k] for k in HEADLINE_METRICS if k in scores} or dict(list(scores.items())[:6])
    markdown(
        cfg,
        f"\n## Real data: the paper's full system ({cfg.encoder}, from scratch, {cfg.image_size} px, bf16, "
        f"channels_last, batch {cfg.realdata_batch}, {workers} workers) on the {what}\n\n"
        f"Fit {fit_s:.0f} s (max_time {seconds} s): {entry['epochs']} epochs, {entry['steps']} steps, {images} images "
        f"seen; `evaluate` of {ckpt.name} on the test split ({evaluate_s:.0f} s): "
        + (", ".join(f"{k} {v:.3f}" for k, v in shown.items()) or json.dumps(scores))
        + "\n",
    )


# ---------------------------------------------------------------------------------------------- the driver


STEP_FUNCTIONS = {
    "env": step_env,
    "tests": step_tests,
    "train": step_train,
    "infer": step_infer,
    "loader": step_loader,
    "compile": step_compile,
    "realdata": step_realdata,
}


def run_in_child(cfg: Config, name: str) -> int:
    """The body of a step's process: run it, return its exit status."""
    if cfg.smoke:  # tiny steps gain nothing from threads, and on a busy CPU spinning OpenMP threads cost seconds
        import torch

        torch.set_num_threads(1)
    try:
        status = STEP_FUNCTIONS[name](cfg)
        return int(status or 0)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def launch(cfg: Config, name: str, limit: float, spawn: bool) -> tuple[str, float]:
    """Run one step in a new process session; kill the whole session at ``limit`` seconds."""
    start = time.monotonic()
    if spawn:
        command = [sys.executable, __file__, str(cfg.out), "--step", name, "--scratch", str(cfg.scratch)]
        command += ["--fit-seconds", str(cfg.fit_seconds)] + (["--smoke"] if cfg.smoke else [])
        pid = subprocess.Popen(command, start_new_session=True).pid
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            os._exit(run_in_child(cfg, name))
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = "ok" if os.waitstatus_to_exitcode(raw) == 0 else f"failed ({os.waitstatus_to_exitcode(raw)})"
        elif time.monotonic() - start > limit:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
        else:
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # what the step left behind: loader workers, compile workers, wandb
    return status, time.monotonic() - start


def preload() -> None:
    """Import what the steps import, once, before forking (no CUDA call: the children may use CUDA)."""
    import pytest  # noqa: F401
    import pytorch_lightning  # noqa: F401
    import torch  # noqa: F401
    from _bench import machine  # noqa: F401
    from bench_inference import make_runner  # noqa: F401
    from bench_training import PlainNet  # noqa: F401

    import skinfusion
    from skinfusion.cli import main  # noqa: F401

    for name in ("SkinFusionNet", "SkinFusionModule", "SkinFusionDataModule", "MultiTaskLoss", "Predictor"):
        getattr(skinfusion, name)
    with contextlib.suppress(ImportError):
        import wandb  # noqa: F401


def summarize(cfg: Config, steps: list[dict]) -> str:
    """The closing table of results.md and of the log: the figures that answer the issue."""
    rows = results(cfg)
    lines = ["\n## Summary\n", "| step | status | seconds | limit (s) |", "| --- | --- | ---: | ---: |"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['limit_s']:.0f} |" for s in steps]
    fastest = fastest_training(cfg)
    if fastest:
        workers = workers_to_feed(cfg, fastest["images_per_s"])
        loader_rows = [r for r in rows if r.get("kind") == "loader"]
        feed = (
            f"{workers} loader worker{'s' if workers > 1 else ''} feed{'' if workers > 1 else 's'} it"
            if workers
            else f"more than {max(r['workers'] for r in loader_rows)} loader workers needed"
            if loader_rows
            else "loader not measured"
        )
        met = "met" if fastest["images_per_s"] >= GOAL_IMAGES_PER_S else "not met"
        goal = "" if cfg.smoke else f" (goal {GOAL_IMAGES_PER_S}: {met})"
        lines.append(
            f"\nFastest training: {fastest['variant']}, {fastest['images_per_s']:.0f} img/s{goal}, "
            f"{fastest['fraction_of_bf16_ceiling'] * 100:.1f}% of the bf16 ceiling; {feed}."
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder (OUTDIR of run.sh)")
    parser.add_argument("--smoke", action="store_true", help="the same steps on the CPU, tiny network, 32 px")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # a spawned step's process
    parser.add_argument("--scratch", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--fit-seconds", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        cfg = make_config(out, args.smoke, args.scratch, args.fit_seconds)
        return run_in_child(cfg, args.step)

    started = float(os.environ.get("KIT_START", time.time()))
    scratch = Path(tempfile.mkdtemp(prefix="skinfusion-gpu-kit-"))
    cfg = make_config(out, args.smoke, scratch)
    os.environ.update(
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(scratch),
        SKINFUSION_CACHE=str(scratch / "skinfusion-cache"),
        MPLBACKEND="Agg",
        HF_HUB_OFFLINE="1",
    )
    spawn = os.environ.get("KIT_LAUNCH", "fork" if args.smoke else "spawn") == "spawn"
    wanted = [s for s in STEPS if s in args.steps.split(",")]
    print(
        f"[kit] {'smoke' if args.smoke else 'GPU'} run, steps {','.join(wanted)}, launch "
        f"{'spawn' if spawn else 'fork'}, budget {cfg.budget_s:.0f} s, scratch {scratch}",
        flush=True,
    )
    markdown(
        cfg,
        f"# skinfusion GPU kit, {time.strftime('%Y-%m-%d %H:%M %Z')}"
        f" ({'smoke: CPU, tiny network' if cfg.smoke else 'GPU'})",
    )
    if not spawn:
        preload()
    steps = []
    for name in wanted:
        remaining = started + cfg.budget_s - time.time()
        limit = min(cfg.caps[name], remaining)
        if name == "realdata":  # the fit: what its cap leaves after its reserve, and room for compile after it
            if "compile" in wanted:
                limit = min(limit, remaining - cfg.compile_min_s)
            cfg.fit_seconds = int(limit - cfg.realdata_reserve_s)
            if cfg.fit_seconds < cfg.min_fit_s:
                limit = 0
        if limit < 5:
            status, seconds = "skipped (no time left)", 0.0
        else:
            print(f"[kit] step {name}: limit {limit:.0f} s", flush=True)
            status, seconds = launch(cfg, name, limit, spawn)
        steps.append({"step": name, "status": status, "seconds": seconds, "limit_s": max(limit, 0)})
        record(cfg, kind="step", step=name, status=status, seconds=seconds, limit_s=max(limit, 0))
        print(f"[kit] step {name}: {status} in {seconds:.1f} s", flush=True)
    summary = summarize(cfg, steps)
    markdown(cfg, summary)
    print(summary, flush=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"[kit] done in {time.time() - started:.0f} s; files in {out}: {', '.join(sorted(os.listdir(out)))}")
    return 0 if all(s["status"] == "ok" for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
