"""The GPU kit (``benchmarks/gpu/``) stays working without a GPU: ``run.sh OUTDIR --smoke`` runs every step on
the CPU with a tiny network and must write what the GPU run writes, within the device's limits on what comes back
(at most 8 files, no deeper than 2 folders, names of letters, digits, ``.``, ``_`` and ``-``)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KIT = REPO / "benchmarks" / "gpu"
OUTPUTS = {"log.txt", "env.txt", "tests.txt", "results.md", "results.jsonl", "realdata.txt"}
# The smoke run takes about a minute on 2 cores beside other jobs and several on a machine busy with more.
pytestmark = pytest.mark.timeout(1500)


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_kit_{name}", KIT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def kit():
    return _load("kit")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    """One ``run.sh OUTDIR --smoke`` (about 40 s on 2 quiet cores), shared by the tests below."""
    root = tmp_path_factory.mktemp("gpu_kit")
    out = root / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KIT_")}
    env["PYTHON"] = sys.executable
    start = time.perf_counter()
    done = subprocess.run(
        ["bash", str(KIT / "run.sh"), str(out), "--smoke"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    seconds = time.perf_counter() - start
    lines = (out / "results.jsonl").read_text().splitlines() if (out / "results.jsonl").is_file() else []
    return {
        "out": out,
        "returncode": done.returncode,
        "output": done.stdout + done.stderr,
        "seconds": seconds,
        "results": [json.loads(line) for line in lines],
    }


def _kind(smoke: dict, kind: str) -> list[dict]:
    return [r for r in smoke["results"] if r.get("kind") == kind]


def test_smoke_run_finishes_every_step(smoke, kit):
    assert smoke["returncode"] == 0, smoke["output"][-4000:]
    steps = {r["step"]: r["status"] for r in _kind(smoke, "step")}
    assert steps == dict.fromkeys(kit.STEPS, "ok")
    # Each step ran within the limit the kit gave it.
    assert all(r["seconds"] <= r["limit_s"] for r in _kind(smoke, "step"))
    # The whole run stays within the budget the kit gives itself (its steps' limits only stop a hung step).
    assert smoke["seconds"] < kit.make_config(smoke["out"], True, smoke["out"]).budget_s + 60


def test_outputs_are_what_the_device_returns(smoke):
    files = list(smoke["out"].rglob("*"))
    assert {p.name for p in files} == OUTPUTS
    assert len(files) <= 8
    for path in files:
        assert path.is_file()
        assert path.parent == smoke["out"]  # flat: well within 2 folders
        assert re.fullmatch(r"[A-Za-z0-9._-]+", path.name)
        assert 0 < path.stat().st_size < 16 * 2**20


def test_env_names_the_versions_and_the_bf16_ceiling(smoke):
    env = (smoke["out"] / "env.txt").read_text()
    assert "torch " in env
    assert "nvidia-smi" in env
    assert re.search(r"bf16 matmul ceiling: [0-9.]+ TFLOP/s", env)
    assert "requirements of skinfusion: 0 problem(s)" in env
    (entry,) = _kind(smoke, "env")
    assert entry["bf16_tflops"] > 0
    assert entry["requirements_ok"] is True


def test_cuda_tests_are_selected_and_their_dry_run_passes_on_the_cpu(smoke, kit):
    (entry,) = _kind(smoke, "tests")
    assert entry["exit_code"] == 0
    assert entry["files"] == ["tests/test_cuda.py"]
    # SKINFUSION_CUDA_TESTS_ON_CPU=1: the smoke run checks the tests' logic; channels_last and compile are deselected
    # there (test_speed_options checks both on the CPU), so none of the others may skip.
    assert entry.get("passed", 0) >= 9
    assert not entry.get("skipped")
    assert not entry.get("failed")
    assert "passed" in (smoke["out"] / "tests.txt").read_text()
    assert kit.cuda_test_files() == ["tests/test_cuda.py"]


def test_training_throughput_rows(smoke, kit):
    rows = {r["variant"]: r for r in _kind(smoke, "train")}
    config = kit.make_config(smoke["out"], True, smoke["out"])
    assert set(rows) == {*config.train_variants, config.compile_variant}
    for name, row in rows.items():
        assert row["images_per_s"] > 0, name
        assert row["flops_per_image"] > 0, name
        # Below 1 on a GPU; on a CPU smoke run a loaded machine or emulated kernels (ATEN_CPU_CAPABILITY=avx2 on
        # an AVX-512 CPU: no bf16 matmul units) can measure the ceiling below a 32 px toy network's rate.
        assert row["fraction_of_bf16_ceiling"] > 0, name
        assert row["peak_mib"] > 0, name
        assert row["bf16"] == ("bf16" in name)
        assert row["cl"] == ("+cl" in name)
    for name, row in rows.items():  # against the plain loop in the same precision and layout, where it ran
        if not name.startswith("plain") and (row["bf16"], row["cl"]) in {(False, False), (True, True)}:
            assert row["vs_plain"] > 0, name
    assert rows["skinfusion+bf16+cl+compile"]["compile"] is True
    assert rows["skinfusion"]["network"] == "paper full"
    assert rows["skinfusion+bf16+cl+samenet"]["network"] == "plain loop's"
    # Same network, same count: the plain loop's network and skinfusion's samenet form.
    assert rows["plain"]["flops_per_image"] == pytest.approx(rows["skinfusion+bf16+cl+samenet"]["flops_per_image"])


def test_inference_and_loader_rows(smoke, kit):
    infer = {(r["variant"], r["batch_size"]): r["images_per_s"] for r in _kind(smoke, "infer")}
    batches = kit.make_config(smoke["out"], True, smoke["out"]).infer_batches  # (1, 64) on the GPU
    assert set(infer) == {(v, b) for v in ("eager", "eager+cl+bf16") for b in batches}
    assert all(rate > 0 for rate in infer.values())
    loader = _kind(smoke, "loader")
    assert [r["workers"] for r in loader][:1] == [1]
    assert all(r["images_per_s"] > 0 for r in loader)


def test_real_data_run_trains_then_evaluates_the_test_split(smoke):
    (entry,) = _kind(smoke, "realdata")
    assert entry["steps"] >= 1
    assert entry["images_seen"] == entry["steps"] * 8
    assert "synthetic" in entry["data"]  # the smoke run makes its own small cache
    metrics = entry["test_metrics"]
    for key in ("task1/threshold_jaccard", "task3/balanced_accuracy"):
        assert 0.0 <= metrics[key] <= 1.0
    text = (smoke["out"] / "realdata.txt").read_text()
    assert "$ skinfusion fit" in text
    assert "$ skinfusion evaluate" in text


def test_results_md_has_every_section_and_the_summary(smoke):
    text = (smoke["out"] / "results.md").read_text()
    for title in (
        "## Environment",
        "## CUDA tests",
        "## Training throughput:",
        "## Inference",
        "## Loader",
        "## Training throughput with torch.compile",
        "## Real data",
        "## Summary",
        "Fastest training:",
    ):
        assert title in text, title


def test_a_step_past_its_limit_is_killed_with_its_children(kit, tmp_path, monkeypatch):
    marker = tmp_path / "grandchild.pid"

    def hangs(cfg) -> None:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        marker.write_text(str(child.pid))
        time.sleep(60)

    monkeypatch.setitem(kit.STEP_FUNCTIONS, "env", hangs)
    cfg = kit.make_config(tmp_path, False, tmp_path)
    status, seconds = kit.launch(cfg, "env", limit=5.0, spawn=False)
    assert status == "timeout"
    assert 5.0 <= seconds < 15
    stat = Path(f"/proc/{int(marker.read_text())}/stat")
    for _ in range(50):  # killed: gone, or a zombie until whoever adopted it reaps it
        if not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child process survived: {stat.read_text()}")


def test_a_spawned_step_runs_in_a_fresh_interpreter(kit, tmp_path):
    """On the GPU every step is a fresh ``kit.py --step`` process (the smoke run forks them instead)."""
    cfg = kit.make_config(tmp_path, True, tmp_path)
    status, _ = kit.launch(cfg, "env", limit=300.0, spawn=True)
    assert status == "ok"
    assert "bf16 matmul ceiling" in (tmp_path / "env.txt").read_text()
    (entry,) = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert entry["kind"] == "env"


# ---------------------------------------------------------------- packaging helpers


def test_check_wheels_reports_what_is_missing(tmp_path):
    check = _load("check_wheels")
    problems = check.check_wheels(tmp_path)  # an empty wheel folder
    assert "not downloaded: wandb==0.31.0 (run benchmarks/gpu/fetch_wheels.sh)" in problems
    # Of skinfusion's own requirements, the image lacks exactly these five (it has torch, timm, ...).
    missing = {p.split()[1] for p in problems if p.startswith("missing:")}
    assert missing == {
        "albumentations>=1.4",
        "grad-cam>=1.5",
        "jsonargparse[signatures]>=4.32",
        "segmentation-models-pytorch>=0.3.4",
        "wandb>=0.17",
    }
    # A wheel that needs something neither the wheels nor the image provide.
    with zipfile.ZipFile(tmp_path / "lonely-1.0-py3-none-any.whl", "w") as archive:
        archive.writestr(
            "lonely-1.0.dist-info/METADATA", "Name: lonely\nVersion: 1.0\nRequires-Dist: nowhere-to-be-found>=1\n"
        )
    problems = check.check_wheels(tmp_path)
    assert "not in wheels.txt: lonely-1.0-py3-none-any.whl" in problems
    assert "missing: nowhere-to-be-found>=1 (wanted by lonely-1.0-py3-none-any.whl)" in problems


def test_fetched_wheels_meet_every_requirement():
    folder = REPO / ".whl"
    if not any(folder.glob("*.whl")):
        pytest.skip("no .whl/ here (benchmarks/gpu/fetch_wheels.sh downloads it)")
    assert _load("check_wheels").check_wheels(folder) == []


def test_subset_cache_keeps_lesion_groups_within_the_budget(tmp_path):
    from skinfusion.cli import main

    main(["prepare", "--source", f"synthetic:{tmp_path / 'syn'}:n=60,size=48", "--out", str(tmp_path / "prep")])
    out = tmp_path / "subset"
    done = subprocess.run(
        [sys.executable, str(KIT / "subset_cache.py"), str(tmp_path / "prep"), str(out), "--budget-mib", "0.05"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "of 60 images" in done.stdout
    with open(out / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert 0 < len(rows) < 60
    assert not {"orig_image", "orig_mask"} & set(rows[0])  # they point at files that do not travel
    with open(tmp_path / "prep" / "manifest.csv", newline="") as f:
        original = {r["id"]: r for r in csv.DictReader(f)}
    for row in rows:
        assert row["split"] == original[row["id"]]["split"]
        assert (out / row["image"]).read_bytes() == (tmp_path / "prep" / row["image"]).read_bytes()
    assert sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) <= 0.05 * 2**20 + 4096  # + subset.json
    assert json.loads((out / "subset.json").read_text())["images"] == len(rows)


def test_kit_sizes_the_batch_and_names_the_peak_for_each_lent_card(kit):
    """The kit runs on an H100 (80 GB, about 78 GiB usable) first and an H200 (141 GB) as the fallback: the same
    training batch on both so their figures compare, a smaller one on a smaller card, and each card's datasheet
    bf16 peak (the H100 PCIe and NVL variants differ from the SXM one)."""
    assert kit.train_batch_for(78.0) == kit.train_batch_for(139.0) == 128
    assert kit.train_batch_for(40.0) < 128
    assert kit.train_batch_for(None) == 128
    assert kit.datasheet_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert kit.datasheet_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert kit.datasheet_bf16_tflops("NVIDIA H200") == 989.0
    assert kit.datasheet_bf16_tflops("Tesla T4") is None


def test_kit_plan_leaves_slack_in_its_budget():
    """README's table of expected step times adds up to under the 470 s the kit enforces (slack for a slow start)."""
    text = (REPO / "benchmarks" / "gpu" / "README.md").read_text()
    rows = [line.split("|") for line in text.splitlines() if re.match(r"\| \d+ \| \w+ \|", line)]
    assert len(rows) == 8
    upper = [float(row[5].strip().split("-")[-1]) for row in rows]
    assert sum(upper) < 470, upper
