"""Balanced accuracy as the held-out check scores it: one source's images, every lesion counted once.

    python experiments/metadata/per_lesion.py --study docs/study-cpu --manifest isic2018-cache/manifest.csv \
        [--variant full ...] [--source isic_task3]

The cross-validated figures README quotes score every labelled image of the pool: the ISIC Task 1 images (no
metadata: "with metadata" is the image-only prediction there) and HAM10000 images, where a lesion photographed
several times counts several times. The held-out check scores HAM10000 with one image per lesion, with and
without its age, sex and site. This script scores a study's predictions that way, without retraining: only the
images of ``--source`` (default ``isic_task3``, HAM10000), each lesion weighted once (its images' mean
correctness: the expected score of one image drawn per lesion). Interval: 95 % two-level bootstrap, seeds, then
lesions within their class (``skinfusion.evaluation.intervals``). Not part of the package.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
from fusion_weight import load_runs, log_probabilities

from skinfusion.evaluation.intervals import balanced_accuracy_statistic, two_level_bootstrap


def read_manifest(path: Path) -> dict[str, tuple[str, str]]:
    """id -> (source, lesion id or the image's own id)."""
    with path.open(newline="") as handle:
        return {row["id"]: (row["source"], row["lesion_id"] or row["id"]) for row in csv.DictReader(handle)}


def per_lesion(study: Path, variant: str, manifest: dict[str, tuple[str, str]], source: str) -> dict:
    """Seed-mean balanced accuracy both ways, lesions weighted once, with intervals and per-class support."""
    runs = load_runs(study, variant)
    seeds = sorted({seed for seed, _ in runs})
    folds = sorted({fold for _, fold in runs})
    complete = [s for s in seeds if all((s, k) in runs for k in folds)]
    if not complete:
        raise SystemExit(f"{study}: no seed of {variant!r} has every fold finished")
    classes = next(iter(runs.values()))["classes"]
    k = len(classes)
    report = {"variant": variant, "seeds": complete, "classes": classes}
    for way in ("with metadata", "images alone"):
        truth_of: dict[str, int] = {}  # lesion -> class
        correct = []  # per seed: lesion -> its images' mean correctness
        for s in complete:
            hits: dict[str, list[bool]] = {}
            for fold in folds:
                run = runs[s, fold]
                predicted = log_probabilities(run, way).argmax(1)
                for image, truth, guess in zip(run["ids"], run["truth"], predicted, strict=True):
                    image_source, lesion = manifest[image]
                    if image_source == source:
                        hits.setdefault(lesion, []).append(guess == truth)
                        truth_of[lesion] = truth
            correct.append({lesion: float(np.mean(v)) for lesion, v in hits.items()})
        lesions = sorted(truth_of)
        truth = np.array([truth_of[lesion] for lesion in lesions])
        matrix = np.array([[c[lesion] for lesion in lesions] for c in correct])
        statistic = balanced_accuracy_statistic(matrix, truth, k)
        estimate, low, high = two_level_bootstrap(statistic, len(complete), lesions, truth)
        recall = [float(matrix[:, truth == c].mean()) if (truth == c).any() else float("nan") for c in range(k)]
        per_seed = [statistic([np.array([r])], np.arange(len(truth))) for r in range(len(complete))]
        report[way] = {
            "balanced_accuracy": (estimate, low, high),
            "per_seed": per_seed,
            "recall": recall,
            "support": np.bincount(truth, minlength=k).tolist(),
        }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--manifest", type=Path, required=True)
    parser.add_argument("--variant", nargs="+", default=["baseline", "attention", "fusion", "full"])
    parser.add_argument("--source", default="isic_task3", help="score only this manifest source (default: HAM10000)")
    args = parser.parse_args()
    manifest = read_manifest(args.manifest)
    for variant in args.variant:
        report = per_lesion(args.study, variant, manifest, args.source)
        classes = report["classes"]
        support = report["images alone"]["support"]
        print(f"\n{variant}, seeds {report['seeds']}, {args.source} lesions: {sum(support)}")
        print(
            "| way | balanced accuracy [95 %] | per seed | "
            + " | ".join(f"{c} ({n})" for c, n in zip(classes, support, strict=True))
            + " |"
        )
        print("| --- | ---: | ---: | " + " | ".join("---:" for _ in classes) + " |")
        for way in ("with metadata", "images alone"):
            r = report[way]
            estimate, low, high = r["balanced_accuracy"]
            print(
                f"| {way} | {estimate:.3f} [{low:.3f}, {high:.3f}] | "
                + " / ".join(f"{v:.3f}" for v in r["per_seed"])
                + " | "
                + " | ".join(f"{v:.2f}" for v in r["recall"])
                + " |"
            )


if __name__ == "__main__":
    main()
