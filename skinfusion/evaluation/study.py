"""``skinfusion study``: train variants x seeds under one budget, score them on a held-out split, compare.

Each variant is a config file or ``key=value`` overrides on top of the shared base configs. Every (variant, seed)
run trains with ``skinfusion fit`` in its own process under the same budget (optimiser steps, or wall-clock with
``max_time``) into ``OUT/runs/<variant>-seed<seed>/`` (W&B: one group per study), keeps the checkpoint that the
configs' ``ModelCheckpoint`` picked (else ``last.ckpt``) and is scored on the held-out split at the original
resolution by :func:`~skinfusion.evaluation.report.evaluate` (the official ISIC metrics).

Seeds change ``seed_everything`` only: the split, data order and augmentation follow ``data.seed``, so the
variants are compared on the same images. The summary (``study.md``, ``study.csv``, ``study.json``,
``study.png``) gives each variant's mean ± sd over seeds and each row's difference to the baseline (the first
variant) and to the row above, with a 95% two-level bootstrap interval
(:func:`~skinfusion.evaluation.intervals.two_level_replicates`): every replicate draws each variant's seeds with
replacement, independently of the other variants (separate trainings: the same seed in two networks draws
unrelated weights), then the test lesions with replacement within their class, shared by both sides of a
difference. So the interval covers which images were scored *and* which seeds were trained. Balanced accuracy
(the ISIC 2018 Task 3 ranking metric) is the primary metric: its comparisons come first, with a Bonferroni
interval for their number; the other metrics are secondary, described with the same (uncorrected) intervals.

A study is resumable: a finished run (``result.json``) is kept, an interrupted one continues from its
``last.ckpt``; every variant's config is validated (``--print_config``) before any training starts.
``spec.json`` records what defines the study (configs with their hashes, variants, seeds, split, overrides;
config paths relative to the folder the command runs in when they lie inside it, as README's commands do from
the project root) and the code's git commit; a rerun into the folder resumes only when the definition is the
same, and otherwise names what differs.
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
from skinfusion.evaluation.intervals import percentile_interval, two_level_replicates

log = logging.getLogger(__name__)

__all__ = [
    "METRICS",
    "PRIMARY",
    "Variant",
    "bootstrap_difference",
    "classification_summary",
    "parse_variant",
    "run_study",
    "study_main",
    "study_status",
    "summarize_study",
]

#: The study's columns: key -> (title, kind). ``cls`` metrics come from the argmax of the class
#: probabilities (``*_image_only``: predicted with the metadata withheld, where the networks read any);
#: ``seg`` metrics are per-image means over the images with a mask.
METRICS: dict[str, tuple[str, str]] = {
    "accuracy": ("accuracy", "cls"),
    "precision": ("precision (macro)", "cls"),
    "balanced_accuracy": ("balanced accuracy (= macro recall)", "cls"),
    "f1": ("F1 (macro)", "cls"),
    "auc": ("AUC (macro)", "cls"),
    "balanced_accuracy_image_only": ("balanced accuracy, images alone (age, sex, site withheld)", "cls"),
    "threshold_jaccard": ("thresholded Jaccard", "seg"),
    "dice": ("Dice", "seg"),
}

_BLIND = "_image_only"

#: The primary metric: the study's comparisons are judged on it (ISIC 2018 Task 3 ranks by it); the others describe.
PRIMARY = "balanced_accuracy"


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


def classification_summary(
    truth: np.ndarray, probabilities: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """Accuracy, macro precision / recall (= balanced accuracy) / F1 and macro one-vs-rest AUC of argmax predictions.

    Macro means run over the classes present in the truth, as the ISIC 2018 balanced accuracy does; a present
    class never predicted has precision 0. AUC is the Mann-Whitney statistic with ties counted half.

    Args:
        weights: optional count of each image (a bootstrap resample: image ``i`` drawn ``weights[i]`` times);
            the figures equal those of the images repeated that many times.

    Shape:
        truth (N,) int class indices, probabilities (N, K), weights (N,).
    """
    return _classification_scorer(truth, probabilities)(weights)


def _classification_scorer(
    truth: np.ndarray, probabilities: np.ndarray
) -> Callable[[np.ndarray | None], dict[str, float]]:
    """:func:`classification_summary` of one run as a function of the image weights (argmax and ties precomputed)."""
    truth = np.asarray(truth, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n, k = probabilities.shape
    cells = truth * k + probabilities.argmax(1)
    positives = [truth == c for c in range(k)]
    ties = [np.unique(probabilities[:, c], return_inverse=True)[1].ravel() for c in range(k)]  # score ranks, tied

    def score(weights: np.ndarray | None = None) -> dict[str, float]:
        w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
        matrix = np.bincount(cells, weights=w, minlength=k * k).reshape(k, k)
        support, predicted_count, hits = matrix.sum(1), matrix.sum(0), np.diag(matrix)
        present = support > 0
        recall = hits[present] / support[present]
        precision = np.divide(hits, predicted_count, out=np.zeros(k), where=predicted_count > 0)[present]
        f1 = np.divide(
            2 * precision * recall, precision + recall, out=np.zeros_like(recall), where=precision + recall > 0
        )
        aucs = []
        for c in np.flatnonzero(present):
            # Mann-Whitney over the weighted images: each positive counts the negatives scored below it, ties half.
            pos = np.bincount(ties[c], weights=w * positives[c])
            neg = np.bincount(ties[c], weights=w * ~positives[c])
            if neg.sum() == 0:
                continue
            below = np.cumsum(neg) - neg
            aucs.append((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))
        return {
            "accuracy": float(hits.sum() / max(w.sum(), 1)),
            "precision": float(precision.mean()),
            "balanced_accuracy": float(recall.mean()),
            "f1": float(f1.mean()),
            "auc": float(np.mean(aucs)) if aucs else math.nan,
        }

    return score


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
    """``statistic_a - statistic_b`` with a paired bootstrap interval over ``n`` items (images) alone.

    Both statistics take the same resampled item indices, so whatever the two share (the images, their
    difficulty) cancels; :func:`scipy.stats.bootstrap` draws the resamples (percentile interval). The runs are
    held fixed: on seed-averaged predictions this is the interval the study reported before it resampled the
    seeds, and it misses the seed-to-seed spread. The study compares with the two-level interval instead; this
    one stays as the image-only reference the tests hold the two-level interval against.

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
    from skinfusion.evaluation.report import IMAGE_ONLY_DIR, evaluate
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
    # The lesion of each image: the intervals draw the images of one lesion together.
    per_image: dict[str, Any] = {"ids": [r.id for r in records], "group": {r.id: r.group for r in records}}
    seg_path = out_dir / "per_image_segmentation.csv"
    if seg_path.is_file():
        with open(seg_path, newline="") as f:
            rows = list(csv.DictReader(f))
        for name in ("threshold_jaccard", "dice"):
            per_image[name] = {row["id"]: round(float(row[name]), 6) for row in rows}
    csv_path = out_dir / "predictions" / "predictions.csv"
    labelled = [r for r in records if r.label is not None]
    if labelled and csv_path.is_file():
        with open(csv_path, newline="") as f:
            probs = {row["image"]: [float(row[c]) for c in class_names] for row in csv.DictReader(f)}
        per_image["class_names"] = class_names
        per_image["label"] = {r.id: class_names.index(r.label) for r in labelled}
        per_image["probabilities"] = {r.id: _rounded(probs[r.id]) for r in labelled}
        blind_path = out_dir / IMAGE_ONLY_DIR / "predictions.csv"
        if blind_path.is_file():  # absent: the network reads no metadata, or no image has any (the same both ways)
            with open(blind_path, newline="") as f:
                blind = {row["image"]: [float(row[c]) for c in class_names] for row in csv.DictReader(f)}
            per_image["probabilities_image_only"] = {r.id: _rounded(blind[r.id]) for r in labelled}
    return {"isic": metrics, "per_image": per_image}


def _rounded(values: Sequence[float]) -> list[float]:
    """Six decimals: float32 precision, and result.json stays small enough to commit (about 0.5 MB a run)."""
    return [round(float(x), 6) for x in values]


def _atomic_json(path: Path, value: Any, compact: bool = False) -> None:
    """Write ``value`` as JSON atomically: indented to read, or ``compact`` (no spaces) for the large result files."""
    from skinfusion.io import atomic_write

    text = (
        json.dumps(value, separators=(",", ":"), allow_nan=True)
        if compact
        else json.dumps(value, indent=1, allow_nan=True)
    )
    atomic_write(path, text + "\n")


def _format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _project_path(path: str | Path) -> str:
    """``path`` relative to the folder the command runs in when it lies inside it (posix), else absolute."""
    path = Path(path).resolve()
    try:
        return path.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return str(path)


def _sha1(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()[:12]


def _study_spec(
    name: str,
    base_configs: Sequence[str],
    variants: Sequence[Variant],
    seeds: Sequence[int],
    split: str,
    overrides: Sequence[str],
    cv: dict[str, int] | None = None,
) -> dict[str, Any]:
    """What defines a study (``spec.json``, compared on resume): configs as paths and hashes, variants, seeds..."""
    return ({"cv": cv} if cv else {}) | {
        "name": name,
        "base_configs": [[_project_path(c), _sha1(c)] for c in base_configs],
        "variants": [
            {
                "name": v.name,
                "config": v.config and _project_path(v.config),
                "config_sha1": v.config and _sha1(v.config),
                "overrides": [list(item) for item in v.overrides],
            }
            for v in variants
        ],
        "seeds": list(seeds),
        "split": split,
        "overrides": list(overrides),
    }


def _spec_differences(then: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What differs between the stored study definition and this command's, in words (empty: the same study)."""
    differences = [
        f"{key}: {then.get(key)} when it started, {now[key]} now"
        for key in ("name", "seeds", "split", "cv", "overrides")
        if then.get(key) != now.get(key)
    ]

    def changed(path: str, old: str | None, new: str) -> str:
        return f"{path} has changed (sha1 {old or 'not recorded'} when the study started, {new} now)"

    then_paths, now_paths = [c[0] for c in then.get("base_configs", [])], [c[0] for c in now["base_configs"]]
    if then_paths != now_paths:
        differences.append(f"base configs: {then_paths} when it started, {now_paths} now")
    else:
        differences += [
            changed(path, old, new)
            for (path, old), (_, new) in zip(then["base_configs"], now["base_configs"], strict=True)
            if old != new
        ]
    then_names, now_names = [v["name"] for v in then.get("variants", [])], [v["name"] for v in now["variants"]]
    if then_names != now_names:
        return [*differences, f"variants: {then_names} when it started, {now_names} now"]
    for old, new in zip(then["variants"], now["variants"], strict=True):
        if old.get("config") != new["config"]:
            differences.append(
                f"variant {new['name']!r}: config {old.get('config')} when it started, {new['config']} now"
            )
        elif old.get("config_sha1") != new["config_sha1"]:
            differences.append(
                f"variant {new['name']!r}: " + changed(new["config"], old.get("config_sha1"), new["config_sha1"])
            )
        if old.get("overrides") != new["overrides"]:
            differences.append(
                f"variant {new['name']!r}: overrides {old.get('overrides')} when it started, {new['overrides']} now"
            )
    return differences


def _code_version() -> dict[str, Any] | None:
    """The git commit of the skinfusion checkout running the study and whether it has uncommitted changes."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return None  # installed inside some other repository: its commit says nothing about this code
        return {"commit": git("rev-parse", "HEAD"), "uncommitted_changes": bool(git("status", "--porcelain", "-uno"))}
    except (OSError, subprocess.SubprocessError):
        return None


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
    cv_folds: int = 0,
    cv_seed: int = 0,
    work: str | Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) a study and write its summary; see the module docstring.

    Args:
        out: the study's folder (``runs/<run>/result.json`` and the summary files go here).
        variants: :class:`Variant` s or specs for :func:`parse_variant`; the first is the baseline.
        split: the held-out split scored (``val`` to tune without touching the test split); ignored with
            ``cv_folds``.
        cv_folds: score by lesion-grouped cross-validation instead (``data.cv_folds``, seeded by ``cv_seed``): every
            variant x seed trains ``cv_folds`` runs, run ``k`` on the other folds of the train+val pool, scored on
            fold ``k`` with its last checkpoint (validated once, at the end: the fold it would pick by is the one
            scored), so every lesion is scored once per seed and no run sees the test split. Runs go seed by
            seed, so an interrupted study has complete seeds first.
        work: where the runs train (checkpoints, logs, ``evaluate`` reports; default ``out/runs``); ``out`` then
            holds only the small per-run ``result.json`` (per-image predictions) and the summary, which can be
            committed: a rerun finds those runs finished and trains nothing.
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
    if cv_folds == 1 or cv_folds < 0:
        raise StudyError(f"cv_folds must be 0 (off) or >= 2, got {cv_folds}")
    base_configs = [str(Path(c).resolve()) for c in base_configs]
    for config in base_configs:
        if not Path(config).is_file():
            raise StudyError("base config not found", config)
    overrides = [*budget_overrides(max_steps, max_time, cv_folds), *overrides]
    split = "cv" if cv_folds else split
    cv = {"folds": cv_folds, "seed": cv_seed} if cv_folds else None
    spec = _study_spec(name, base_configs, variants, seeds, split, overrides, cv)
    code = _code_version()
    out.mkdir(parents=True, exist_ok=True)
    spec_path = out / "spec.json"
    stored = json.loads(spec_path.read_text()) if spec_path.is_file() else None
    if stored is not None:
        _check_resume(out, stored, spec, code)
    # Every variant's config must parse before any run trains.
    resolved = _resolved_configs({v: _fit_command(base_configs, v, overrides, seeds[0]) for v in variants})
    if stored is None:
        _atomic_json(spec_path, {**spec, "code": code})

    if cv_folds:  # seed by seed: an interrupted study has its first seeds complete
        runs = [(v, s, k) for s in seeds for v in variants for k in range(cv_folds)]
    else:
        runs = [(v, s, None) for v in variants for s in seeds]
    work = Path(work).resolve() if work is not None else out / "runs"
    todo = [(n, *run) for n, run in enumerate(runs, 1) if not _result_path(out, *run).is_file()]
    # ``lock`` guards the progress lines; ``evaluating`` runs one evaluation at a time while the other runs train
    started, lock, evaluating = time.monotonic(), threading.Lock(), threading.Lock()
    durations: list[float] = []
    threads = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None

    def one(number: int, variant: Variant, seed: int, fold: int | None) -> None:
        run_dir = work / _run_name(variant.name, seed, fold)
        if progress:
            with lock:
                left = len(todo) - len(durations)
                eta = f", about {_format_seconds(np.mean(durations) * left / jobs)} left" if durations else ""
                which = f"{variant.name}, seed {seed}" + (f", fold {fold}" if fold is not None else "")
                print(f"study {name}: run {number}/{len(runs)} ({which}){eta}", file=sys.stderr)
        run_started = time.monotonic()
        command = _fit_command(base_configs, variant, overrides, seed)
        data = resolved[variant.name]["data"]
        if fold is not None:
            folds = {"cv_folds": cv_folds, "cv_fold": fold, "cv_seed": cv_seed}
            command += [f"--data.{key}={value}" for key, value in folds.items()]
            data = {**data, **folds}
        _train(command, run_dir, resolved[variant.name], name, threads)
        checkpoint = _pick_checkpoint(run_dir) if fold is None else _last_checkpoint(run_dir)
        if checkpoint is None:
            raise StudyError("the run wrote no checkpoint", run_dir)
        with evaluating:  # one evaluation at a time, with all the threads
            evaluation = _evaluate_run(checkpoint, data, "val" if fold is not None else split, run_dir / "eval", device)
        result = {
            "variant": variant.name,
            "seed": seed,
            **({"fold": fold} if fold is not None else {}),
            "checkpoint": _relative(checkpoint, out),
            "checkpoint_step": _steps_of(checkpoint),
            "steps": _steps_of(_last_checkpoint(run_dir)),
            "fit_seconds": float((run_dir / "fit_seconds").read_text()),
            "code": code,
            **evaluation,
        }
        result_path = _result_path(out, variant, seed, fold)
        result_path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_json(result_path, result, compact=True)
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


def budget_overrides(max_steps: int | None, max_time: str | None, cv_folds: int = 0) -> list[str]:
    """The ``skinfusion fit`` arguments of a study's budget (the first of ``spec.json``'s overrides)."""
    budget = [f"--trainer.max_steps={max_steps}", "--trainer.max_epochs=-1"] if max_steps else []
    if max_steps:  # validate on global steps that end on max_steps, else a run stopping mid-epoch skips its end
        every = next((max_steps // n for n in (4, 5, 3, 6, 2) if max_steps % n == 0), max_steps)
        every = max_steps if cv_folds else every  # cross-validation scores the last step: validate there only
        budget += ["--trainer.check_val_every_n_epoch=null", f"--trainer.val_check_interval={every}"]
    return budget + ([f"--trainer.max_time={max_time}"] if max_time else [])


def study_status(out: str | Path) -> list[dict[str, Any]]:
    """Every run that ``out``'s ``spec.json`` defines, in the order the study trains them: its name and, when its
    ``result.json`` is there, its steps, fit minutes and balanced accuracy both ways (the run's own images)."""
    out = Path(out)
    spec = json.loads((out / "spec.json").read_text())
    names, seeds = [v["name"] for v in spec["variants"]], spec["seeds"]
    folds = (spec.get("cv") or {}).get("folds") or 0
    if folds:
        runs = [(v, s, k) for s in seeds for v in names for k in range(folds)]
    else:
        runs = [(v, s, None) for v in names for s in seeds]
    rows = []
    for variant, seed, fold in runs:
        name = _run_name(variant, seed, fold)
        path = out / "runs" / name / "result.json"
        row: dict[str, Any] = {"run": name, "finished": path.is_file()}
        if row["finished"]:
            result = json.loads(path.read_text())
            metrics = result.get("isic", {})
            row |= {
                "steps": result.get("steps"),
                "fit_minutes": result.get("fit_seconds", math.nan) / 60,
                "balanced_accuracy": metrics.get("task3/balanced_accuracy", math.nan),
                "balanced_accuracy_image_only": metrics.get(
                    "task3_image_only/balanced_accuracy", metrics.get("task3/balanced_accuracy", math.nan)
                ),
                "images": metrics.get("task3/num_images"),
            }
        rows.append(row)
    return rows


def _status_markdown(out: Path, rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if r["finished"]]
    lines = [
        f"{out}: {len(done)} of {len(rows)} runs finished" + ("" if len(done) < len(rows) else " (summary: rerun)"),
        "",
        md_row("run", "steps", "fit min", "images", "balanced accuracy", "images alone"),
        md_row("---", "---:", "---:", "---:", "---:", "---:"),
    ]
    for r in rows:
        if r["finished"]:
            cells = [r["steps"], f"{r['fit_minutes']:.1f}", r["images"]]
            cells += [f"{r['balanced_accuracy']:.3f}", f"{r['balanced_accuracy_image_only']:.3f}"]
        else:
            cells = ["not finished", "", "", "", ""]
        lines.append(md_row(r["run"], *cells))
    return "\n".join(lines)


def _run_name(variant: str, seed: int, fold: int | None = None) -> str:
    return f"{variant}-seed{seed}" + (f"-fold{fold}" if fold is not None else "")


def _result_path(out: Path, variant: Variant, seed: int, fold: int | None) -> Path:
    return out / "runs" / _run_name(variant.name, seed, fold) / "result.json"


def _relative(path: Path, folder: Path) -> str:
    """``path`` relative to ``folder`` when inside it, else absolute."""
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path)


def _check_resume(out: Path, stored: dict[str, Any], spec: dict[str, Any], code: dict[str, Any] | None) -> None:
    """Refuse a folder that holds another study, naming what differs; warn when the code has moved on."""
    differences = _spec_differences(stored, json.loads(json.dumps(spec)))
    if differences:
        raise StudyError(
            "holds a different study: " + "; ".join(differences) + ". Rerun the command it started with, from the"
            " folder it started in (config paths are stored relative to it), to resume it, or choose another --out",
            out,
        )
    then = (stored.get("code") or {}).get("commit")
    if then and code and code["commit"] != then:
        log.warning(
            "%s: the study started at commit %s, this code is at %s: runs trained now may differ from the finished"
            " ones (each result.json records its commit)",
            out,
            then[:12],
            code["commit"][:12],
        )


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
    folds = (spec.get("cv") or {}).get("folds") or 0
    results = {}
    for name in names:
        for seed in spec["seeds"]:
            runs = []
            for fold in range(folds) if folds else [None]:
                path = out / "runs" / _run_name(name, seed, fold) / "result.json"
                if not path.is_file():
                    which = f"run {name}, seed {seed}" + (f", fold {fold}" if fold is not None else "")
                    raise StudyError(f"{which} has not finished; rerun the study command", path)
                runs.append(json.loads(path.read_text()))
            results[name, seed] = _join_folds(runs, out / "runs" / _run_name(name, seed)) if folds else runs[0]
    return spec, names, spec["seeds"], results


_PER_IMAGE = ("group", "label", "probabilities", "probabilities_image_only", "threshold_jaccard", "dice")


def _join_folds(runs: list[dict[str, Any]], where: Path) -> dict[str, Any]:
    """One result of a variant x seed from its cross-validation folds' results: each fold's images, once.

    Raises:
        StudyError: an image scored by two folds (the runs are not the folds of one assignment).
    """
    ids = [i for run in runs for i in run["per_image"]["ids"]]
    if len(set(ids)) != len(ids):
        twice = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise StudyError(f"images scored by two folds, e.g. {twice}: the runs are not the folds of one split", where)
    per_image: dict[str, Any] = {"ids": ids}
    blind = any("probabilities_image_only" in run["per_image"] for run in runs)
    for run in runs:
        one = run["per_image"]
        if "probabilities" in one:
            per_image["class_names"] = one["class_names"]
            if blind:  # the same both ways in a fold whose evaluation wrote no image-only pass
                one = {"probabilities_image_only": one["probabilities"], **one}
        for key in _PER_IMAGE:
            if key in one:
                per_image.setdefault(key, {}).update(one[key])
    return {
        "steps": float(np.mean([run["steps"] or run["checkpoint_step"] for run in runs])),
        "checkpoint_step": float(np.mean([run["checkpoint_step"] for run in runs])),
        "fit_seconds": float(np.mean([run["fit_seconds"] for run in runs])),  # per run, like the other mode
        "per_image": per_image,
    }


def _arrays(results: dict, names: list[str], seeds: list[int]) -> dict[str, Any]:
    """Per-image arrays on the images every run scored: labels, probabilities (V,S,N,K), seg scores (V,S,N), lesions.

    ``groups`` / ``seg_groups``: the lesion of each labelled / masked image; runs scored before ``result.json``
    recorded lesions count every image as its own (``lesions_known`` False).
    """
    first = results[names[0], seeds[0]]["per_image"]
    lesions = first.get("group", {})
    arrays: dict[str, Any] = {"lesions_known": "group" in first}
    if "label" in first:
        ids = sorted(first["label"])
        arrays["class_names"] = first["class_names"]
        arrays["label"] = np.array([first["label"][i] for i in ids])
        arrays["groups"] = [lesions.get(i, i) for i in ids]
        for key in ("probabilities", "probabilities_image_only"):  # image only: the same where not recorded
            arrays[key] = np.array(
                [
                    [
                        [
                            results[n, s]["per_image"].get(key, results[n, s]["per_image"]["probabilities"])[i]
                            for i in ids
                        ]
                        for s in seeds
                    ]
                    for n in names
                ]
            )
        arrays["image_only_recorded"] = any("probabilities_image_only" in r["per_image"] for r in results.values())
    # Variants without a decoder (the paper's baseline and attention) have no segmentation scores: NaN rows.
    segmenting = [n for n in names if "threshold_jaccard" in results[n, seeds[0]]["per_image"]]
    if segmenting:
        ids = sorted(results[segmenting[0], seeds[0]]["per_image"]["threshold_jaccard"])
        arrays["seg_groups"] = [lesions.get(i, i) for i in ids]
        missing = [math.nan] * len(ids)
        for key in ("threshold_jaccard", "dice"):
            arrays[key] = np.array(
                [
                    [[results[n, s]["per_image"][key][i] for i in ids] if n in segmenting else missing for s in seeds]
                    for n in names
                ]
            )
    return arrays


def _comparison_pairs(n_variants: int) -> list[tuple[int, int, str]]:
    """``(variant, reference, kind)``: each variant against the baseline and (from the third on) the row above."""
    pairs = []
    for v in range(1, n_variants):
        pairs.append((v, 0, "baseline"))
        if v > 1:
            pairs.append((v, v - 1, "row above"))
    return pairs


def _difference_replicates(
    per_run: Callable[[int, int, np.ndarray], np.ndarray],
    variants: list[int],
    n_seeds: int,
    pairs: list[tuple[int, int]],
    groups: Sequence[Any],
    strata: np.ndarray | None,
    n_resamples: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Seed-mean differences ``(pairs, metrics)`` between ``variants`` and their ``(n_resamples, pairs, metrics)``
    two-level replicates.

    ``per_run(variant, run, items)`` gives one run's metrics on the images ``items``. Every variant is one arm of
    :func:`~skinfusion.evaluation.intervals.two_level_replicates`: its seeds are drawn on their own and the lesions
    once for all, so a difference is paired on images and not on seeds (see that module), and every comparison and
    metric comes from the same replicates.
    """

    def statistic(seed_draws: Sequence[np.ndarray], items: np.ndarray) -> np.ndarray:
        means = {}
        for v, runs in zip(variants, seed_draws, strict=True):
            drawn, counts = np.unique(runs, return_counts=True)
            means[v] = counts @ np.array([per_run(v, r, items) for r in drawn]) / counts.sum()
        return np.array([means[v] - means[reference] for v, reference in pairs])

    return two_level_replicates(statistic, [n_seeds] * len(variants), groups, strata, n_resamples)


def summarize_study(out: str | Path, n_resamples: int = 2000, confidence_level: float = 0.95) -> dict[str, Any]:
    """Write ``study.md``, ``study.csv``, ``study.json`` and ``study.png`` from the finished runs in ``out``."""
    from skinfusion.evaluation.isic import nanmean

    out = Path(out)
    spec, names, seeds, results = _load_results(out)
    arrays = _arrays(results, names, seeds)
    blind = arrays.get("image_only_recorded", False)
    metrics = [
        m
        for m, (_, kind) in METRICS.items()
        if (kind == "cls" and "label" in arrays and (blind or not m.endswith(_BLIND))) or m in arrays
    ]
    cls, seg = [m for m in metrics if METRICS[m][1] == "cls"], [m for m in metrics if METRICS[m][1] == "seg"]
    primary = PRIMARY if PRIMARY in metrics else metrics[0]
    n_images = {m: arrays[m].shape[2] if m in seg else len(arrays["label"]) for m in metrics}
    scorers = {
        way: [[_classification_scorer(arrays["label"], p) for p in runs] for runs in arrays.get(key, [])]
        for way, key in (("", "probabilities"), (_BLIND, "probabilities_image_only"))
    }

    def cls_scores(v: int, run: int, weights: np.ndarray | None = None) -> dict[str, float]:
        """Run ``run`` of variant ``v``: every classification metric, both ways (``*_image_only``)."""
        scores = scorers[""][v][run](weights)
        if blind:
            scores |= {f"{k}{_BLIND}": x for k, x in scorers[_BLIND][v][run](weights).items()}
        return scores

    per_seed = {m: np.array([[cls_scores(v, s)[m] for s in range(len(seeds))] for v in range(len(names))]) for m in cls}
    per_seed |= {m: arrays[m].mean(axis=2) for m in seg}  # (variants, seeds); NaN: the variant does not segment
    rows = []
    for v, name in enumerate(names):
        row: dict[str, Any] = {"variant": name, "runs": len(seeds)}
        for metric in metrics:
            row[metric] = float(per_seed[metric][v].mean())
            row[f"{metric}_sd"] = float(per_seed[metric][v].std(ddof=1)) if len(seeds) > 1 else math.nan
            row[f"{metric}_seeds"] = per_seed[metric][v].tolist()
            row[f"{metric}_n"] = n_images[metric]
        row["steps"] = float(np.mean([results[name, s]["steps"] or results[name, s]["checkpoint_step"] for s in seeds]))
        row["fit_minutes"] = float(np.mean([results[name, s]["fit_seconds"] for s in seeds]) / 60)
        if "label" in arrays:
            tables = [per_class_table(arrays["label"], p, arrays["class_names"]) for p in arrays["probabilities"][v]]
            row["per_class"] = {c: {k: nanmean([t[c][k] for t in tables]) for k in tables[0][c]} for c in tables[0]}
            if blind:
                tables = [
                    per_class_table(arrays["label"], p, arrays["class_names"])
                    for p in arrays["probabilities_image_only"][v]
                ]
                for c, entry in row["per_class"].items():
                    entry["recall_image_only"] = nanmean([t[c]["recall"] for t in tables])
            lesions_of = {}
            for group, label in zip(arrays["groups"], arrays["label"], strict=True):
                lesions_of.setdefault(int(label), set()).add(group)
            for c, class_name in enumerate(arrays["class_names"]):
                row["per_class"][class_name]["lesions"] = len(lesions_of.get(c, ()))
        rows.append(row)

    pairs = _comparison_pairs(len(names))
    bonferroni_level = 1 - (1 - confidence_level) / max(len(pairs), 1)
    comparisons = [
        {"variant": names[v], "against": names[ref], "kind": kind, **{m: [math.nan] * 3 for m in metrics}}
        for v, ref, kind in pairs
    ]
    blocks = []  # (metrics, variants measured, per_run, groups, strata)
    if cls:
        n = len(arrays["label"])

        def classification(v: int, run: int, items: np.ndarray) -> np.ndarray:
            scores = cls_scores(v, run, np.bincount(items, minlength=n))
            return np.array([scores[m] for m in cls])

        blocks.append((cls, list(range(len(names))), classification, arrays["groups"], arrays["label"]))
    if seg:
        scores = np.stack([arrays[m] for m in seg], axis=-1)  # (variants, seeds, images, metrics)
        segmenting = [v for v in range(len(names)) if not np.isnan(scores[v]).all()]

        def segmentation(v: int, run: int, items: np.ndarray) -> np.ndarray:
            return scores[v, run, items].mean(axis=0)

        blocks.append((seg, segmenting, segmentation, arrays["seg_groups"], None))
    for block_metrics, measured, per_run, groups, strata in blocks:
        # A pair with a variant that does not segment has no segmentation difference: left NaN.
        kept = [i for i, (v, ref, _) in enumerate(pairs) if v in measured and ref in measured]
        if not kept:
            continue
        estimate, values = _difference_replicates(
            per_run, measured, len(seeds), [pairs[i][:2] for i in kept], groups, strata, n_resamples
        )
        low, high = percentile_interval(values, confidence_level)
        if primary in block_metrics:
            j = block_metrics.index(primary)
            adjusted = percentile_interval(values[:, :, j], bonferroni_level)
        for row_index, i in enumerate(kept):
            for j, metric in enumerate(block_metrics):
                comparisons[i][metric] = [float(x[row_index, j]) for x in (estimate, low, high)]
            if primary in block_metrics:
                comparisons[i][f"{primary}_bonferroni"] = [float(x[row_index]) for x in adjusted]
    measured_intervals = sum(not math.isnan(c[m][0]) for c in comparisons for m in metrics)
    intervals = {
        "method": "two-level bootstrap: each variant's seeds drawn with replacement on their own (separate "
        "trainings), then the lesions with replacement within their class, shared by both sides of a difference; "
        "percentile interval of the difference of seed means",
        "confidence_level": confidence_level,
        "resamples": n_resamples,
        "primary": primary,
        "primary_comparisons": len(pairs),
        "bonferroni_level": bonferroni_level,
        "secondary_intervals": measured_intervals - sum(not math.isnan(c[primary][0]) for c in comparisons),
        "lesions_known": arrays["lesions_known"],
    }
    summary = {
        "spec": spec,
        "metrics": metrics,
        "intervals": intervals,
        "rows": rows,
        "comparisons": comparisons,
        "lesions": len(set(arrays["groups"])) if "groups" in arrays else None,
    }
    _atomic_json(out / "study.json", summary)
    _write_csv(out / "study.csv", rows, comparisons, metrics, primary)
    (out / "study.md").write_text(_markdown(summary))
    _plot(out / "study.png", comparisons, primary, confidence_level, bonferroni_level)
    return summary


def _write_csv(path: Path, rows: list[dict], comparisons: list[dict], metrics: list[str], primary: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        columns = [f"{m}{s}" for m in metrics for s in ("", "_sd", "_low", "_high")]
        writer.writerow(["variant", "against", *columns, f"{primary}_bonferroni_low", f"{primary}_bonferroni_high"])
        for row in rows:
            writer.writerow([row["variant"], "", *[x for m in metrics for x in (row[m], row[f"{m}_sd"], "", "")]])
        for c in comparisons:
            adjusted = c.get(f"{primary}_bonferroni", ["", ""])
            writer.writerow(
                [c["variant"], c["against"], *[x for m in metrics for x in (c[m][0], "", *c[m][1:])], *adjusted]
            )


def _pm(value: float, sd: float) -> str:
    if math.isnan(value):
        return "—"  # not measured (no segmentation head)
    return f"{value:.3f}" if math.isnan(sd) else f"{value:.3f} ± {sd:.3f}"


def _interval(value: Sequence[float]) -> str:
    estimate, low, high = value
    if math.isnan(estimate):
        return "—"
    mark = " *" if low > 0 or high < 0 else ""
    return f"{estimate:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


def _percent(level: float) -> str:
    return f"{100 * level:.3g} %"


def md_row(*cells: Any) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _markdown(summary: dict[str, Any]) -> str:
    spec, rows, metrics, info = summary["spec"], summary["rows"], summary["metrics"], summary["intervals"]
    seeds, primary, comparisons = spec["seeds"], info["primary"], summary["comparisons"]
    secondary = [m for m in metrics if m != primary]
    m, level, adjusted = info["primary_comparisons"], _percent(info["confidence_level"]), info["bonferroni_level"]
    alpha = 1 - info["confidence_level"]
    n_cls = next((rows[0][f"{k}_n"] for k in metrics if METRICS[k][1] == "cls"), 0)
    n_seg = next((rows[0][f"{k}_n"] for k in metrics if METRICS[k][1] == "seg"), 0)
    lesions = (
        f" of {summary['lesions']} lesions"
        if info["lesions_known"]
        else " (no lesion ids recorded: each image counted as its own lesion)"
    )
    title = METRICS[primary][0]
    cv = spec.get("cv")
    scored = (
        f"scored by lesion-grouped {cv['folds']}-fold cross-validation of the train+val pool (fold seed"
        f" {cv['seed']}: each variant x seed is {cv['folds']} runs, run k trained on the other folds and scored on"
        " fold k with its last checkpoint, so every lesion is scored once per seed by a network that never saw it;"
        " the test split is not used)"
        if cv
        else f"scored on the `{spec['split']}` split"
    )
    lines = [
        f"# Study `{spec['name']}`",
        "",
        f"{len(rows)} variants x {len(seeds)} seed(s) ({', '.join(map(str, seeds))}), {scored} at the original"
        f" resolution: {n_cls} labelled images{lesions if n_cls else ''} (diagnosis), {n_seg} images with a mask"
        " (segmentation).",
        "",
        f"## Primary metric: {title}",
        "",
        f"The comparisons are judged on {title.split(' (')[0]} (the ISIC 2018 Task 3 ranking metric) alone; the"
        " other metrics, below, describe.",
        "",
        md_row("variant", f"{title}, mean ± sd over seeds", "each seed"),
        md_row("---", "---:", "---"),
        *(
            md_row(
                r["variant"], _pm(r[primary], r[f"{primary}_sd"]), " / ".join(f"{x:.3f}" for x in r[f"{primary}_seeds"])
            )
            for r in rows
        ),
        "",
        md_row("variant", "against", f"difference [{level} interval]", f"Bonferroni {_percent(adjusted)} interval"),
        md_row("---", "---", "---:", "---:"),
        *(
            md_row(c["variant"], c["against"], _interval(c[primary]), _adjusted(c.get(f"{primary}_bonferroni")))
            for c in comparisons
        ),
        "",
        f"Each row minus its reference. Intervals: two-level bootstrap ({info['resamples']} resamples, percentile):"
        " every replicate draws each variant's seeds with replacement, independently of the other variant's (they"
        " are separate trainings), then the test lesions with replacement within their class, the same lesions for"
        " both sides; the difference is of seed means. So an interval covers both which images were scored and"
        f" which seeds were trained; with {len(seeds)} seed(s) a variant the seed level is coarse and the interval"
        f" wide. `*`: the {level} interval excludes 0. {m} comparison(s) of the primary metric: at {level} each,"
        f" the chance of at least one `*` where no variant differs is up to {m} x {_percent(alpha)} ="
        f" {_percent(min(1.0, m * alpha))}; the Bonferroni interval ({_percent(adjusted)} each,"
        f" {level} for all {m} together) keeps it under {_percent(alpha)}. `†`: that interval excludes 0 too.",
        "",
        "## Secondary metrics (descriptive)",
        "",
        "Mean ± sd over seeds; — : not measured (a variant without the decoder has no segmentation output).",
        "",
        md_row("variant", *[METRICS[k][0] for k in metrics], "steps", "fit min"),
        md_row("---", *["---:"] * len(metrics), "---:", "---:"),
        *(
            md_row(
                r["variant"],
                *[_pm(r[k], r[f"{k}_sd"]) for k in metrics],
                f"{r['steps']:.0f}",
                f"{r['fit_minutes']:.1f}",
            )
            for r in rows
        ),
        "",
    ]
    if secondary and comparisons:
        n = info["secondary_intervals"]
        lines += [
            md_row("variant", "against", *[METRICS[k][0] for k in secondary]),
            md_row("---", "---", *["---:"] * len(secondary)),
            *(md_row(c["variant"], c["against"], *[_interval(c[k]) for k in secondary]) for c in comparisons),
            "",
            f"{n} more {level} intervals, the same two-level bootstrap, not corrected for their number: about"
            f" {n} x {_percent(alpha)} = {n * alpha:.1f} `*` are expected by chance alone where nothing differs,"
            " and the metrics move together (they count the same predictions). Read them as description, not as"
            " findings.",
            "",
        ]
    if "per_class" in rows[0]:
        lines += ["## Per class (argmax predictions, mean over seeds)", ""]
        blind = any("recall_image_only" in t for t in rows[0]["per_class"].values())
        keys = ("accuracy", "precision", "recall", *(("recall_image_only",) if blind else ()), "f1")
        for row in rows:
            lines += [
                f"**{row['variant']}**",
                "",
                md_row(
                    "class",
                    "images",
                    "lesions",
                    "accuracy",
                    "precision",
                    "recall",
                    *(("recall, images alone",) if blind else ()),
                    "F1",
                ),
                md_row("---", *["---:"] * (len(keys) + 2)),
            ]
            for c, t in row["per_class"].items():
                cells = ["n/a" if math.isnan(t[k]) else f"{t[k]:.3f}" for k in keys]
                lines.append(md_row(c, f"{t['support']:.0f}", t.get("lesions", "—"), *cells))
            lines.append("")
    run_name = "<variant>-seed<seed>" + ("-fold<k>" if cv else "")
    lines += [
        f"Commands, configs and seeds: `spec.json`; every run's per-image predictions: `runs/{run_name}/result.json`"
        " (its checkpoints, `fit.log` and `evaluate` report where it trained: `runs/` or the study's `--work`).",
        "",
    ]
    return "\n".join(lines)


def _adjusted(interval: Sequence[float] | None) -> str:
    if interval is None or math.isnan(interval[0]):
        return "—"
    low, high = interval
    return f"[{low:+.3f}, {high:+.3f}]" + (" †" if low > 0 or high < 0 else "")


def _plot(path: Path, comparisons: list[dict], primary: str, level: float, adjusted: float) -> None:
    """The primary metric's differences, one large panel (880 px wide: readable at README width)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 1.6 + 0.55 * max(len(comparisons), 1)))
    ax = figure.subplots()
    labels = [f"{c['variant']} − {c['against']}" for c in comparisons]
    for y, c in enumerate(comparisons):
        estimate, low, high = c[primary]
        if math.isnan(estimate):
            continue
        colour = "tab:blue" if low > 0 else "tab:red" if high < 0 else "tab:gray"
        wide = c.get(f"{primary}_bonferroni")
        if wide is not None:
            ax.hlines(y, *wide, color=colour, linewidth=1.2)
        ax.errorbar(
            estimate,
            y,
            xerr=[[estimate - low], [high - estimate]],
            fmt="o",
            color=colour,
            capsize=5,
            elinewidth=3,
            markersize=8,
        )
    ax.axvline(0.0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=12)
    ax.set_ylim(len(labels) - 0.5 if labels else 0.5, -0.5)
    ax.tick_params(axis="x", labelsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.set_xlabel(f"difference in {METRICS[primary][0].split(' (')[0]} (variant − reference)", fontsize=12)
    ax.set_title(
        f"{METRICS[primary][0].split(' (')[0]}: {_percent(level)} two-level interval (thick; seeds and lesions),"
        f"\nBonferroni {_percent(adjusted)} (thin); blue/red: the {_percent(level)} interval excludes 0",
        fontsize=11,
    )
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
            "resolution (official ISIC metrics), and compare the variants on balanced accuracy with two-level "
            "(seeds, then lesions) bootstrap intervals. "
            "Rerun the same command to resume. Arguments after `--` go to every `skinfusion fit`."
        ),
        epilog=(
            "example: skinfusion study --config experiments/base.yaml --config experiments/paper/cpu.yaml "
            "--variant experiments/paper/baseline.yaml --variant experiments/paper/full.yaml --seeds 0 1 "
            "--max-steps 600 --out studies/paper -- --data.manifest=isic2018-cache/manifest.csv"
        ),
    )
    parser.add_argument("--config", action="append", default=[], help="base config (repeat; required to run)")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="FILE.yaml, NAME=FILE.yaml, NAME:KEY=VALUE[,KEY=VALUE] or NAME=FILE.yaml:KEY=VALUE (repeat; the "
        "first is the baseline)",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seed_everything values (default: 0)")
    parser.add_argument("--out", required=True, type=Path, help="the study's folder")
    parser.add_argument(
        "--status",
        action="store_true",
        help="only list the study's runs in --out: finished (steps, minutes, balanced accuracy both ways) or not;"
        " trains nothing (no --config or --variant needed)",
    )
    parser.add_argument("--split", choices=("train", "val", "test"), default="test", help="split scored")
    parser.add_argument(
        "--cv-folds",
        type=int,
        default=0,
        metavar="K",
        help="score by lesion-grouped K-fold cross-validation of the train+val pool instead of --split: K runs per"
        " variant x seed, every lesion scored once per seed (enough rare-class lesions; default: off)",
    )
    parser.add_argument("--cv-seed", type=int, default=0, help="seed of the folds (data.cv_seed; default: 0)")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="where the runs train (checkpoints, logs, reports; default: OUT/runs); OUT then keeps only the"
        " per-run result.json and the summary: small enough to commit, and a rerun finds those runs finished",
    )
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
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    if args.pop("status"):
        if not (args["out"] / "spec.json").is_file():
            parser.error(f"{args['out']}: no study here (no spec.json)")
        rows = study_status(args["out"])
        print(_status_markdown(args["out"], rows))
        return {"runs": rows}
    if not args["config"] or not args["variant"]:
        parser.error("give the base configs (--config) and the variants (--variant), or --status")
    if args["cv_folds"] and "--split" in argv:
        parser.error("give --split or --cv-folds, not both")
    if args["cv_folds"] < 0 or args["cv_folds"] == 1:
        parser.error(f"--cv-folds must be >= 2 (or 0: off), got {args['cv_folds']}")
    out, configs, variants = args.pop("out"), args.pop("config"), args.pop("variant")
    summary = run_study(out, configs, variants, overrides=overrides, n_resamples=args.pop("resamples"), **args)
    print((out / "study.md").read_text())
    return summary
