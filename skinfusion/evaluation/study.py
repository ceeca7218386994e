"""``skinfusion study``: train variants x seeds under one budget, score them on a held-out split, compare.

Each variant is a config file or ``key=value`` overrides on top of the shared base configs. Every (variant, seed)
run trains with ``skinfusion fit`` in its own process under the same budget (optimiser steps, or wall-clock with
``max_time``) into ``OUT/runs/<variant>-seed<seed>/`` (W&B: one group per study), keeps the checkpoint that the
configs' ``ModelCheckpoint`` picked (else ``last.ckpt``) and is scored on the held-out split at the original
resolution by :func:`~skinfusion.evaluation.report.evaluate` (the official ISIC metrics).

Seeds change ``seed_everything`` only: the split, data order and augmentation follow ``data.seed``, so the
variants are compared on the same images. The summary (``study.md``, ``study.csv``, ``study.json``,
``study.png``) gives each variant's mean ± sd over seeds and each row's difference to the baseline (the first
variant) and to the row above, with a 95% paired bootstrap interval over the test images of the seed-averaged
metric (so it covers both image sampling and the seeds run).

A study is resumable: a finished run (``result.json``) is kept, an interrupted one continues from its
``last.ckpt``; every variant's config is validated (``--print_config``) before any training starts.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from skinfusion.errors import SkinFusionError

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "Variant",
    "bootstrap_difference",
    "classification_summary",
    "parse_variant",
    "run_study",
    "study_main",
    "summarize_study",
]

#: The study's columns: key -> (title, kind). ``cls`` metrics come from the argmax of the class
#: probabilities; ``seg`` metrics are per-image means over the images with a mask.
METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("accuracy", "cls"),
    "precision": ("precision (macro)", "cls"),
    "balanced_accuracy": ("balanced accuracy (= macro recall)", "cls"),
    "f1": ("F1 (macro)", "cls"),
    "auc": ("AUC (macro)", "cls"),
    "threshold_jaccard": ("thresholded Jaccard", "seg"),
    "dice": ("Dice", "seg"),
}


class StudyError(SkinFusionError, ValueError):
    """A study that cannot run as asked: a bad variant, a config that does not parse, a different study in OUT."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(f"{path}: {message}" if path else message)


# ---------------------------------------------------------------------------------------------- variants


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of the study: a name, an optional config file, and ``key=value`` overrides (LightningCLI keys)."""

    name: str
    config: str | None = None
    overrides: tuple[tuple[str, str], ...] = ()

    def arguments(self) -> list[str]:
        """The ``skinfusion fit`` arguments of this variant."""
        args = ["--config", self.config] if self.config else []
        return args + [f"--{key}={value}" for key, value in self.overrides]


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_OVERRIDE_SPLIT = re.compile(r",(?=[A-Za-z_][\w.]*=)")  # a comma that starts the next key=value


def parse_variant(spec: str) -> Variant:
    """Parse ``FILE.yaml``, ``NAME=FILE.yaml``, ``NAME:KEY=VALUE[,KEY=VALUE...]`` or ``NAME=FILE.yaml:KEY=VALUE``.

    Values may hold commas (``[skip,classifier]``): a comma only separates overrides when a ``key=`` follows.

    Raises:
        StudyError: a missing config file, an empty or malformed override, or an unusable name.
    """
    head, _, tail = spec.partition(":") if not re.match(r"^[A-Za-z]:[\\/]", spec) else (spec, "", "")
    name, eq, config = head.partition("=")
    if not eq:
        name, config = ("", head) if head.endswith((".yaml", ".yml")) else (head, "")
    config = config or None
    if config is not None:
        if not Path(config).is_file():
            raise StudyError(f"variant {spec!r}: config file not found", config)
        config = str(Path(config).resolve())
        name = name or Path(config).stem
    overrides = []
    for item in _OVERRIDE_SPLIT.split(tail) if tail else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise StudyError(f"variant {spec!r}: {item!r} is not KEY=VALUE")
        overrides.append((key.strip().removeprefix("--"), value))
    if not name or not _NAME.match(name):
        raise StudyError(f"variant {spec!r}: give it a name of letters, digits, '_', '.', '+', '-' (NAME:KEY=VALUE)")
    if config is None and not overrides:
        raise StudyError(f"variant {spec!r} has neither a config file nor overrides")
    return Variant(name, config, tuple(overrides))


# ---------------------------------------------------------------------------------------------- metrics


def confusion_matrix(truth: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """(K,K) counts: rows are true classes, columns the argmax predictions."""
    k = probabilities.shape[1]
    predicted = np.asarray(probabilities).argmax(1)
    return np.bincount(np.asarray(truth, dtype=np.int64) * k + predicted, minlength=k * k).reshape(k, k)


def classification_summary(truth: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, macro precision / recall (= balanced accuracy) / F1 and macro one-vs-rest AUC of argmax predictions.

    Macro means run over the classes present in the truth, as the ISIC 2018 balanced accuracy does; a present
    class never predicted has precision 0. AUC is the Mann-Whitney statistic with ties counted half.

    Shape:
        truth (N,) int class indices, probabilities (N, K).
    """
    from scipy.stats import rankdata

    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    matrix = confusion_matrix(truth, probabilities).astype(np.float64)
    support, predicted_count, hits = matrix.sum(1), matrix.sum(0), np.diag(matrix)
    present = support > 0
    recall = hits[present] / support[present]
    precision = np.divide(hits, predicted_count, out=np.zeros(len(hits)), where=predicted_count > 0)[present]
    f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(recall), where=precision + recall > 0)
    aucs = []
    for c in np.flatnonzero(present):
        positive = truth == c
        n_pos, n_neg = positive.sum(), (~positive).sum()
        if n_neg == 0:
            continue
        ranks = rankdata(probabilities[:, c])
        aucs.append((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return {
        "accuracy": float(hits.sum() / max(len(truth), 1)),
        "precision": float(precision.mean()),
        "balanced_accuracy": float(recall.mean()),
        "f1": float(f1.mean()),
        "auc": float(np.mean(aucs)) if aucs else math.nan,
    }


def per_class_table(truth: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]) -> dict[str, dict]:
    """The paper's per-class table of argmax predictions: one-vs-rest accuracy, precision, recall and F1."""
    matrix = confusion_matrix(truth, probabilities)
    n = int(matrix.sum())
    table = {}
    for c, name in enumerate(class_names):
        tp, predicted, support = float(matrix[c, c]), float(matrix[:, c].sum()), float(matrix[c].sum())
        fp, fn = predicted - tp, support - tp
        # As in the macro means: a present class never predicted has precision 0; an absent one, none.
        table[name] = {
            "support": int(support),
            "accuracy": (n - fp - fn) / n,
            "precision": tp / predicted if predicted else (0.0 if support else math.nan),
            "recall": tp / support if support else math.nan,
            "f1": 2 * tp / (2 * tp + fp + fn) if support else math.nan,
        }
    return table


def bootstrap_difference(
    statistic_a: Callable[[np.ndarray], float],
    statistic_b: Callable[[np.ndarray], float],
    n: int,
    n_resamples: int = 2000,
    confidence_level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic_a - statistic_b`` with a paired bootstrap interval over ``n`` items (images).

    Both statistics take the same resampled item indices, so whatever the two share (the images, their
    difficulty) cancels; :func:`scipy.stats.bootstrap` draws the resamples (percentile interval).

    Returns:
        ``(difference on all items, low, high)``.
    """
    from scipy.stats import DegenerateDataWarning, bootstrap

    def difference(index: np.ndarray) -> float:
        return statistic_a(index) - statistic_b(index)

    index = np.arange(n)
    estimate = difference(index)
    with warnings.catch_warnings():  # every resample equal (e.g. identical runs): a zero-width interval, not a fault
        warnings.simplefilter("ignore", DegenerateDataWarning)
        result = bootstrap(
            (index,),
            difference,
            vectorized=False,
            paired=True,
            n_resamples=n_resamples,
            confidence_level=confidence_level,
            method="percentile",
            rng=np.random.default_rng(seed),
        )
    low, high = result.confidence_interval
    return float(estimate), float(low), float(high)


# ---------------------------------------------------------------------------------------------- runs


def _fit_command(base_configs: Sequence[str], variant: Variant, overrides: Sequence[str], seed: int) -> list[str]:
    configs = [arg for config in base_configs for arg in ("--config", config)]
    command = [sys.executable, "-m", "skinfusion", "fit", *configs, *variant.arguments(), *overrides]
    return [*command, f"--seed_everything={seed}"]


def _resolved_configs(commands: dict[Variant, list[str]]) -> dict[str, dict[str, Any]]:
    """Each variant's full config (``--print_config``, all at once): checks they parse before anything trains."""
    processes = {
        variant: subprocess.Popen(
            [*command, "--print_config"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env()
        )
        for variant, command in commands.items()
    }
    resolved = {}
    for variant, process in processes.items():
        stdout, stderr = process.communicate()
        if process.returncode != 0:
            message = (stderr or stdout).strip().splitlines()
            raise StudyError(f"variant {variant.name!r}: its config does not parse: {' '.join(message[-3:])}")
        resolved[variant.name] = yaml.safe_load(stdout)
    return resolved


def _child_env() -> dict[str, str]:
    return {"PYTHONUNBUFFERED": "1", **os.environ}


def _loggers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The config's ``trainer.logger`` entries that name a class."""
    loggers = config.get("trainer", {}).get("logger") or []
    loggers = loggers if isinstance(loggers, list) else [loggers]
    return [logger for logger in loggers if isinstance(logger, dict) and "class_path" in logger]


def _run_loggers(config: dict[str, Any], run_dir: Path, study: str) -> list[dict[str, Any]]:
    """The config's loggers, writing into ``run_dir`` (CSV: ``run_dir/metrics.csv``; W&B: group ``study``)."""
    out = []
    for logger in _loggers(config):
        init = {**(logger.get("init_args") or {}), "save_dir": str(run_dir)}
        if logger["class_path"].endswith(("CSVLogger", "TensorBoardLogger")):
            init.update(name="", version="")
        if logger["class_path"].endswith("WandbLogger"):
            init.update(name=run_dir.name, group=study, version=None, id=None)
        out.append({"class_path": logger["class_path"], "init_args": init})
    return out or [{"class_path": "pytorch_lightning.loggers.CSVLogger", "init_args": {"save_dir": str(run_dir)}}]


def _last_checkpoint(run_dir: Path) -> Path | None:
    last = sorted(run_dir.rglob("last.ckpt"))
    return last[-1] if last else None


def _pick_checkpoint(run_dir: Path) -> Path:
    """The newest ``best-*.ckpt`` (what ``ModelCheckpoint`` picked by validation), else ``last.ckpt``."""
    best = sorted(run_dir.rglob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    checkpoint = best[-1] if best else _last_checkpoint(run_dir)
    if checkpoint is None:
        raise StudyError("the run wrote no checkpoint", run_dir)
    return checkpoint


def _steps_of(checkpoint: Path | None) -> int | None:
    from skinfusion.io import load_checkpoint

    return None if checkpoint is None else int(load_checkpoint(checkpoint).get("global_step", 0))


def _evaluate_run(checkpoint: Path, data: dict[str, Any], split: str, out_dir: Path, device: str) -> dict[str, Any]:
    """Score a checkpoint on the split's records, with the run's label map, at the original resolution."""
    from skinfusion.data.datamodule import SkinFusionDataModule
    from skinfusion.evaluation.report import evaluate
    from skinfusion.inference.inputs import collect_records
    from skinfusion.inference.predictor import Predictor

    datamodule = SkinFusionDataModule(**data)
    datamodule.prepare_data()
    records, class_names = datamodule.records(split), list(datamodule.class_names)
    if datamodule.manifest:
        originals = {r.id: r for r in collect_records(datamodule.manifest)}
        records = [dataclasses.replace(r, image=originals[r.id].image, mask=originals[r.id].mask) for r in records]
    records = [r for r in records if r.mask is not None or r.label is not None]
    predictor = Predictor(checkpoint, device=device, progress=False)
    if getattr(predictor.net, "decoder", None) is None:
        # No segmentation head (the paper's baseline and attention variants): diagnosis is all it is scored on.
        records = [dataclasses.replace(r, mask=None) for r in records if r.label is not None]
    metrics = evaluate(predictor, records, out_dir, worst=4)
    per_image: dict[str, Any] = {"ids": [r.id for r in records]}
    seg_path = out_dir / "per_image_segmentation.csv"
    if seg_path.is_file():
        with open(seg_path, newline="") as f:
            rows = list(csv.DictReader(f))
        for name in ("threshold_jaccard", "dice"):
            per_image[name] = {row["id"]: float(row[name]) for row in rows}
    csv_path = out_dir / "predictions" / "predictions.csv"
    labelled = [r for r in records if r.label is not None]
    if labelled and csv_path.is_file():
        with open(csv_path, newline="") as f:
            probs = {row["image"]: [float(row[c]) for c in class_names] for row in csv.DictReader(f)}
        per_image["class_names"] = class_names
        per_image["label"] = {r.id: class_names.index(r.label) for r in labelled}
        per_image["probabilities"] = {r.id: probs[r.id] for r in labelled}
    return {"isic": metrics, "per_image": per_image}


def _atomic_json(path: Path, value: Any) -> None:
    from skinfusion.io import atomic_write

    atomic_write(path, json.dumps(value, indent=1, allow_nan=True) + "\n")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def run_study(
    out: str | Path,
    base_configs: Sequence[str | Path],
    variants: Sequence[Variant | str],
    seeds: Sequence[int] = (0,),
    split: str = "test",
    max_steps: int | None = None,
    max_time: str | None = None,
    overrides: Sequence[str] = (),
    device: str = "auto",
    name: str | None = None,
    n_resamples: int = 2000,
    jobs: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a study and write its summary; see the module docstring.

    Args:
        out: the study's folder (``runs/`` and the summary files go here).
        variants: :class:`Variant` s or specs for :func:`parse_variant`; the first is the baseline.
        split: the held-out split scored (``val`` to tune without touching the test split).
        max_steps: optimiser steps per run (validated 4 times where max_steps allows, always at the last step);
            ``max_time``: wall-clock limit per run (``DD:HH:MM:SS``); both apply.
        overrides: LightningCLI arguments added to every run (``--data.manifest=...``).
        device: device of the evaluation.
        name: the study's name (W&B group); default: the folder's name.
        jobs: runs trained at the same time, each with ``cpu_count // jobs`` threads (on a CPU, 2 runs of 1
            thread each do more work per minute than 1 run of 2 threads); evaluations run one at a time.

    Returns:
        The summary written to ``study.json``.

    Raises:
        StudyError: a bad variant or config (before any training), or ``out`` holding a different study.
    """
    out = Path(out).resolve()
    name = name or out.name
    variants = [v if isinstance(v, Variant) else parse_variant(v) for v in variants]
    if not variants:
        raise StudyError("a study needs at least one variant")
    if len({v.name for v in variants}) != len(variants):
        raise StudyError(f"variant names must differ: {[v.name for v in variants]}")
    if jobs < 1:
        raise StudyError(f"jobs must be >= 1, got {jobs}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"seeds must be distinct and non-empty, got {list(seeds)}")
    base_configs = [str(Path(c).resolve()) for c in base_configs]
    for config in base_configs:
        if not Path(config).is_file():
            raise StudyError("base config not found", config)
    budget = [f"--trainer.max_steps={max_steps}", "--trainer.max_epochs=-1"] if max_steps else []
    if max_steps:  # validate on global steps that end on max_steps, else a run stopping mid-epoch skips its end
        every = next((max_steps // n for n in (4, 5, 3, 6, 2) if max_steps % n == 0), max_steps)
        budget += ["--trainer.check_val_every_n_epoch=null", f"--trainer.val_check_interval={every}"]
    budget += [f"--trainer.max_time={max_time}"] if max_time else []
    overrides = [*budget, *overrides]
    spec = {
        "name": name,
        "base_configs": [[c, hashlib.sha1(Path(c).read_bytes()).hexdigest()[:12]] for c in base_configs],
        "variants": [dataclasses.asdict(v) for v in variants],
        "seeds": list(seeds),
        "split": split,
        "overrides": list(overrides),
    }
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    if spec_path.is_file() and json.loads(spec_path.read_text()) != json.loads(json.dumps(spec)):
        raise StudyError(
            "holds a different study (other configs, variants, seeds, split or overrides); rerun the same"
            " command to resume it, or choose another --out",
            out,
        )
    # Every variant's config must parse before any run trains.
    resolved = _resolved_configs({v: _fit_command(base_configs, v, overrides, seeds[0]) for v in variants})
    _atomic_json(spec_path, spec)

    runs = [(variant, seed) for variant in variants for seed in seeds]
    todo = [
        (n, v, s)
        for n, (v, s) in enumerate(runs, 1)
        if not (out / "runs" / f"{v.name}-seed{s}" / "result.json").is_file()
    ]
    started, lock = time.monotonic(), threading.Lock()
    durations: list[float] = []
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def one(number: int, variant: Variant, seed: int) -> None:
        run_dir = out / "runs" / f"{variant.name}-seed{seed}"
        if progress:
            with lock:
                left = len(todo) - len(durations)
                eta = f", about {_format_seconds(np.mean(durations) * left / jobs)} left" if durations else ""
                print(f"study {name}: run {number}/{len(runs)} ({variant.name}, seed {seed}){eta}", file=sys.stderr)
        run_started = time.monotonic()
        _train(_fit_command(base_configs, variant, overrides, seed), run_dir, resolved[variant.name], name, threads)
        checkpoint = _pick_checkpoint(run_dir)
        with lock:  # one evaluation at a time, with all the threads
            evaluation = _evaluate_run(checkpoint, resolved[variant.name]["data"], split, run_dir / "eval", device)
        result = {
            "variant": variant.name,
            "seed": seed,
            "checkpoint": str(checkpoint.relative_to(out)),
            "checkpoint_step": _steps_of(checkpoint),
            "steps": _steps_of(_last_checkpoint(run_dir)),
            "fit_seconds": float((run_dir / "fit_seconds").read_text()),
            **evaluation,
        }
        _atomic_json(run_dir / "result.json", result)
        with lock:
            durations.append(time.monotonic() - run_started)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(one, *run) for run in todo]:
            future.result()  # the first failure stops the study (finished runs are kept)
    if progress and durations:
        print(
            f"study {name}: {len(durations)} run(s) in {_format_seconds(time.monotonic() - started)}", file=sys.stderr
        )
    summary = summarize_study(out, n_resamples=n_resamples)
    _log_to_wandb(summary, out, resolved[variants[0].name])
    return summary


def _train(command: list[str], run_dir: Path, config: dict[str, Any], study: str, threads: int | None) -> None:
    """Run the ``skinfusion fit`` command into ``run_dir``; continue from its ``last.ckpt`` when one is there."""
    last = _last_checkpoint(run_dir)
    if last is None and run_dir.exists():
        shutil.rmtree(run_dir)  # a run killed before its first checkpoint: nothing to keep
    run_dir.mkdir(parents=True, exist_ok=True)
    command = [*command, f"--trainer.logger={json.dumps(_run_loggers(config, run_dir, study))}"]
    command += [f"--ckpt_path={last}"] if last else []
    previous = float((run_dir / "fit_seconds").read_text()) if (run_dir / "fit_seconds").is_file() else 0.0
    started = time.monotonic()
    with open(run_dir / "fit.log", "a") as log_file:
        log_file.write(f"$ {' '.join(command)}\n")
        log_file.flush()
        env = _child_env() | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        returncode = subprocess.run(command, stdout=log_file, stderr=subprocess.STDOUT, env=env).returncode
    (run_dir / "fit_seconds").write_text(f"{previous + time.monotonic() - started:.1f}\n")
    if returncode != 0:
        tail = (run_dir / "fit.log").read_text().strip().splitlines()[-5:]
        raise StudyError(f"training failed (exit {returncode}); the end of its log:\n  " + "\n  ".join(tail), run_dir)


# ---------------------------------------------------------------------------------------------- summary


def _load_results(out: Path) -> tuple[dict[str, Any], list[str], list[int], dict[tuple[str, int], dict]]:
    spec = json.loads((out / "spec.json").read_text())
    names = [v["name"] for v in spec["variants"]]
    results = {}
    for name in names:
        for seed in spec["seeds"]:
            path = out / "runs" / f"{name}-seed{seed}" / "result.json"
            if not path.is_file():
                raise StudyError(f"run {name}, seed {seed} has not finished; rerun the study command", path)
            results[name, seed] = json.loads(path.read_text())
    return spec, names, spec["seeds"], results


def _arrays(results: dict, names: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per-image arrays on the images every run scored: labels, probabilities (V,S,N,K), seg scores (V,S,N)."""
    first = results[names[0], seeds[0]]["per_image"]
    arrays: dict[str, Any] = {}
    if "label" in first:
        ids = sorted(first["label"])
        arrays["class_names"] = first["class_names"]
        arrays["label"] = np.array([first["label"][i] for i in ids])
        arrays["probabilities"] = np.array(
            [[[results[n, s]["per_image"]["probabilities"][i] for i in ids] for s in seeds] for n in names]
        )
    # Variants without a decoder (the paper's baseline and attention) have no segmentation scores: NaN rows.
    segmenting = [n for n in names if "threshold_jaccard" in results[n, seeds[0]]["per_image"]]
    if segmenting:
        ids = sorted(results[segmenting[0], seeds[0]]["per_image"]["threshold_jaccard"])
        missing = [math.nan] * len(ids)
        for key in ("threshold_jaccard", "dice"):
            arrays[key] = np.array(
                [
                    [[results[n, s]["per_image"][key][i] for i in ids] if n in segmenting else missing for s in seeds]
                    for n in names
                ]
            )
    return arrays


def _per_seed(arrays: dict[str, Any], metric: str, variant: int, index: Any = slice(None)) -> np.ndarray:
    """``metric`` of each seed of a variant, on the images ``index``."""
    if METRICS[metric][1] == "seg":
        return arrays[metric][variant][:, index].mean(axis=1)
    label = arrays["label"][index]
    return np.array([classification_summary(label, p[index])[metric] for p in arrays["probabilities"][variant]])


def _statistic(arrays: dict[str, Any], metric: str, variant: int) -> Callable[[np.ndarray], float]:
    """The seed-averaged ``metric`` of a variant on a set of image indices (for the bootstrap)."""
    if METRICS[metric][1] == "seg":
        return lambda index: float(arrays[metric][variant][:, index].mean())
    return lambda index: float(_per_seed(arrays, metric, variant, index).mean())


def summarize_study(out: str | Path, n_resamples: int = 2000) -> dict[str, Any]:
    """Write ``study.md``, ``study.csv``, ``study.json`` and ``study.png`` from the finished runs in ``out``."""
    from skinfusion.evaluation.isic import nanmean

    out = Path(out)
    spec, names, seeds, results = _load_results(out)
    arrays = _arrays(results, names, seeds)
    metrics = [m for m, (_, kind) in METRICS.items() if (kind == "cls" and "label" in arrays) or m in arrays]
    n_images = {m: arrays[m].shape[2] if METRICS[m][1] == "seg" else len(arrays["label"]) for m in metrics}
    rows = []
    for v, name in enumerate(names):
        row: dict[str, Any] = {"variant": name, "runs": len(seeds)}
        for metric in metrics:
            per_seed = _per_seed(arrays, metric, v)
            row[metric] = float(per_seed.mean())
            row[f"{metric}_sd"] = float(per_seed.std(ddof=1)) if len(seeds) > 1 else math.nan
            row[f"{metric}_n"] = n_images[metric]
        row["steps"] = float(np.mean([results[name, s]["steps"] or results[name, s]["checkpoint_step"] for s in seeds]))
        row["fit_minutes"] = float(np.mean([results[name, s]["fit_seconds"] for s in seeds]) / 60)
        if "label" in arrays:
            tables = [per_class_table(arrays["label"], p, arrays["class_names"]) for p in arrays["probabilities"][v]]
            row["per_class"] = {c: {k: nanmean([t[c][k] for t in tables]) for k in tables[0][c]} for c in tables[0]}
        rows.append(row)
    comparisons = []
    for v in range(1, len(names)):
        for reference, kind in [(0, "baseline")] + ([(v - 1, "row above")] if v > 1 else []):
            entry: dict[str, Any] = {"variant": names[v], "against": names[reference], "kind": kind}
            for metric in metrics:
                if METRICS[metric][1] == "seg" and np.isnan(arrays[metric][[v, reference]]).all(axis=(1, 2)).any():
                    entry[metric] = (math.nan, math.nan, math.nan)  # one of the two does not segment
                    continue
                entry[metric] = bootstrap_difference(
                    _statistic(arrays, metric, v), _statistic(arrays, metric, reference), n_images[metric], n_resamples
                )
            comparisons.append(entry)
    summary = {"spec": spec, "metrics": metrics, "rows": rows, "comparisons": comparisons}
    _atomic_json(out / "study.json", summary)
    _write_csv(out / "study.csv", rows, comparisons, metrics)
    (out / "study.md").write_text(_markdown(summary))
    _plot(out / "study.png", comparisons, metrics)
    return summary


def _write_csv(path: Path, rows: list[dict], comparisons: list[dict], metrics: list[str]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "against", *[f"{m}{s}" for m in metrics for s in ("", "_sd", "_low", "_high")]])
        for row in rows:
            writer.writerow([row["variant"], "", *[x for m in metrics for x in (row[m], row[f"{m}_sd"], "", "")]])
        for c in comparisons:
            writer.writerow([c["variant"], c["against"], *[x for m in metrics for x in (c[m][0], "", *c[m][1:])]])


def _pm(value: float, sd: float) -> str:
    if math.isnan(value):
        return "—"  # not measured (no segmentation head)
    return f"{value:.3f}" if math.isnan(sd) else f"{value:.3f} ± {sd:.3f}"


def _interval(value: tuple[float, float, float]) -> str:
    estimate, low, high = value
    if math.isnan(estimate):
        return "—"
    mark = " *" if low > 0 or high < 0 else ""
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def md_row(*cells: Any) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _markdown(summary: dict[str, Any]) -> str:
    spec, rows, metrics = summary["spec"], summary["rows"], summary["metrics"]
    seeds = spec["seeds"]
    n_cls = next((rows[0][f"{m}_n"] for m in metrics if METRICS[m][1] == "cls"), 0)
    n_seg = next((rows[0][f"{m}_n"] for m in metrics if METRICS[m][1] == "seg"), 0)
    titles, right = [METRICS[m][0] for m in metrics], ["---:"] * len(metrics)
    lines = [
        f"# Study `{spec['name']}`",
        "",
        f"{len(rows)} variants x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), scored on the "
        f"`{spec['split']}` split at the original resolution: {n_cls} labelled images (diagnosis), "
        f"{n_seg} images with a mask (segmentation). Mean ± sd over seeds; — : not measured (a variant without"
        " the decoder has no segmentation output).",
        "",
        md_row("variant", *titles, "steps", "fit min"),
        md_row("---", *right, "---:", "---:"),
        *(
            md_row(
                r["variant"],
                *[_pm(r[m], r[f"{m}_sd"]) for m in metrics],
                f"{r['steps']:.0f}",
                f"{r['fit_minutes']:.1f}",
            )
            for r in rows
        ),
        "",
        "## Differences",
        "",
        "Each row minus its reference, with a 95% paired bootstrap interval over the test images (seed-averaged "
        "metric; `scipy.stats.bootstrap`, percentile). `*`: the interval excludes 0.",
        "",
        md_row("variant", "against", *titles),
        md_row("---", "---", *right),
        *(md_row(c["variant"], c["against"], *[_interval(c[m]) for m in metrics]) for c in summary["comparisons"]),
    ]
    if "per_class" in rows[0]:
        lines += ["", "## Per class (argmax predictions, mean over seeds)", ""]
        for row in rows:
            lines += [
                f"**{row['variant']}**",
                "",
                "| class | support | accuracy | precision | recall | F1 |",
                "| --- | ---: | ---: | ---: | ---: | ---: |",
            ]
            for c, t in row["per_class"].items():
                cells = [
                    "n/a" if math.isnan(t[k]) else f"{t[k]:.3f}" for k in ("accuracy", "precision", "recall", "f1")
                ]
                lines.append(md_row(c, f"{t['support']:.0f}", *cells))
            lines.append("")
    lines += [
        "",
        "Commands, configs and seeds: `spec.json`; every run's report: `runs/<variant>-seed<seed>/eval/`.",
        "",
    ]
    return "\n".join(lines)


def _plot(path: Path, comparisons: list[dict], metrics: list[str]) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(3.0 * len(metrics), 0.6 + 0.45 * max(len(comparisons), 1)))
    axes = figure.subplots(1, len(metrics), sharey=True, squeeze=False)[0]
    labels = [f"{c['variant']} − {c['against']}" for c in comparisons]
    for ax, metric in zip(axes, metrics, strict=True):
        for y, c in enumerate(comparisons):
            estimate, low, high = c[metric]
            if math.isnan(estimate):
                continue  # not measured for one of the two
            colour = "tab:blue" if low > 0 else "tab:red" if high < 0 else "tab:gray"
            ax.errorbar(estimate, y, xerr=[[estimate - low], [high - estimate]], fmt="o", color=colour, capsize=3)
        ax.axvline(0.0, color="black", linewidth=0.8)
        ax.set_title(METRICS[metric][0], fontsize=9)
        ax.set_yticks(range(len(labels)), labels)
        ax.tick_params(axis="x", labelsize=8)
    figure.suptitle("differences (to the baseline, to the row above), 95% paired bootstrap interval", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _log_to_wandb(summary: dict[str, Any], out: Path, config: dict[str, Any]) -> None:
    """Log the study table and plot once, as one run of the study's W&B group (offline without a server)."""
    wandb_config = next(
        (lg.get("init_args") or {} for lg in _loggers(config) if lg["class_path"].endswith("WandbLogger")), None
    )
    if wandb_config is None or os.environ.get("WANDB_MODE") == "disabled":
        return
    import wandb

    from skinfusion.training.wandb import resolve_wandb_mode

    mode, _ = resolve_wandb_mode()
    name = summary["spec"]["name"]
    run = wandb.init(
        project=wandb_config.get("project") or "skinfusion",
        group=name,
        name=f"{name}-summary",
        job_type="study",
        dir=str(out),
        mode=mode,
        config=summary["spec"],
        reinit="create_new",
    )
    metrics = summary["metrics"]
    table = wandb.Table(
        columns=["variant", *metrics], data=[[r["variant"], *[r[m] for m in metrics]] for r in summary["rows"]]
    )
    run.log({"study/table": table, "study/differences": wandb.Image(str(out / "study.png"))})
    run.finish()
    # Shut the W&B service down: the Python API may go on to start runs of its own (a later fit in the same
    # process), and those must not inherit this run's settings.
    wandb.teardown()


# ---------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skinfusion study",
        description=(
            "Train every variant x seed under one budget, score each on a held-out split at the original "
            "resolution (official ISIC metrics), and compare the variants with paired bootstrap intervals. "
            "Rerun the same command to resume. Arguments after `--` go to every `skinfusion fit`."
        ),
        epilog=(
            "example: skinfusion study --config experiments/base.yaml --config experiments/paper/cpu.yaml "
            "--variant experiments/paper/baseline.yaml --variant experiments/paper/full.yaml --seeds 0 1 "
            "--max-steps 600 --out studies/paper -- --data.manifest=isic2018-cache/manifest.csv"
        ),
    )
    parser.add_argument("--config", action="append", default=[], required=True, help="base config (repeat)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        required=True,
        help="FILE.yaml, NAME=FILE.yaml, NAME:KEY=VALUE[,KEY=VALUE] or NAME=FILE.yaml:KEY=VALUE (repeat; the "
        "first is the baseline)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seed_everything values (default: 0)")
    parser.add_argument("--out", required=True, type=Path, help="the study's folder")
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="split scored")
    parser.add_argument("--max-steps", type=int, default=None, help="optimiser steps per run (equal for all)")
    parser.add_argument("--max-time", default=None, help="wall-clock limit per run, DD:HH:MM:SS")
    parser.add_argument("--device", default="auto", help="evaluation device (default: auto)")
    parser.add_argument("--name", default=None, help="study name and W&B group (default: the --out folder's name)")
    parser.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples (default: 2000)")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained at the same time (default: 1)")
    return parser


def study_main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``skinfusion study``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = vars(build_parser().parse_args(argv))
    out, configs, variants = args.pop("out"), args.pop("config"), args.pop("variant")
    summary = run_study(out, configs, variants, overrides=overrides, n_resamples=args.pop("resamples"), **args)
    print((out / "study.md").read_text())
    return summary
