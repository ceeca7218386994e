"""How much weight the late-fusion metadata evidence should get, from a cross-validated study's predictions.

    python experiments/metadata/fusion_weight.py --study docs/study-cpu --variant full [--tune-fold 0]

Each run of ``skinfusion study --cv-folds K`` records, per image, the class probabilities with the metadata the data
has and with it withheld (``result.json``). With late fusion (``meta_fusion: late``) the difference of their logs is
the metadata model's evidence (``log p(c | age, sex, site) - log p(c)``, up to a per-image constant that no argmax
sees; zero where no metadata is known), so ``log p_image + w * evidence`` is the prediction at fusion weight ``w``
without rerunning anything (``w = 1``: what the network predicts). The weight is chosen on the tuning fold's
images only; the other folds, which it never saw, say whether the choice holds (balanced accuracy of each seed,
with each class's recall and support). Not part of the package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, k: int) -> float:
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in range(k) if (truth == c).any()]))


def log_probabilities(run: dict[str, np.ndarray], way: str) -> np.ndarray:
    """A run's class log-probabilities with the metadata the data has (``"with metadata"``), or on images alone."""
    return run["blind"] + run["evidence"] if way == "with metadata" else run["blind"]


def load_runs(study: Path, variant: str) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """(seed, fold) -> image ids, truth, log p image-only, evidence, for the variant's finished runs."""
    runs = {}
    for path in sorted((study / "runs").glob(f"{variant}-seed*-fold*/result.json")):
        result = json.loads(path.read_text())
        per_image = result["per_image"]
        if "probabilities_image_only" not in per_image:
            raise SystemExit(f"{path}: no image-only predictions (the network reads no metadata)")
        ids = sorted(per_image["label"])
        blind = np.log(np.clip([per_image["probabilities_image_only"][i] for i in ids], 1e-12, None))
        given = np.log(np.clip([per_image["probabilities"][i] for i in ids], 1e-12, None))
        runs[result["seed"], result["fold"]] = {
            "ids": ids,
            "truth": np.array([per_image["label"][i] for i in ids]),
            "blind": blind,
            "evidence": given - blind,
            "classes": per_image["class_names"],
        }
    if not runs:
        raise SystemExit(f"{study}: no finished run of variant {variant!r}")
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--variant", default="full")
    parser.add_argument("--tune-fold", type=int, default=0)
    args = parser.parse_args()
    runs = load_runs(args.study, args.variant)
    classes = next(iter(runs.values()))["classes"]
    k = len(classes)

    def score(run: dict[str, np.ndarray], weight: float) -> float:
        return balanced_accuracy(run["truth"], (run["blind"] + weight * run["evidence"]).argmax(1), k)

    tuning = {s: r for (s, f), r in runs.items() if f == args.tune_fold}
    held = {(s, f): r for (s, f), r in runs.items() if f != args.tune_fold}
    if not tuning:
        raise SystemExit(f"no finished run of fold {args.tune_fold}")
    print(f"{args.variant}: {len(runs)} run(s): (seed, fold) {sorted(runs)}")
    print(f"\nbalanced accuracy by fusion weight, tuning fold {args.tune_fold} (one column a seed):")
    means = {}
    for weight in WEIGHTS:
        values = [score(r, weight) for r in tuning.values()]
        means[weight] = float(np.mean(values))
        print(f"  w = {weight:4.2f}: {means[weight]:.4f}  ({' '.join(f'{v:.4f}' for v in values)})")
    best = max(WEIGHTS, key=lambda w: (means[w], -abs(w - 1.0)))  # ties: the nearer to 1, the network's own
    print(f"chosen on fold {args.tune_fold}: w = {best}")
    if not held:
        print("no other fold has finished: nothing to check the choice on")
        return
    print("\nthe other folds (never used to choose), w = 1 (the network) against the chosen w:")
    for (seed, fold), run in sorted(held.items()):
        support = np.bincount(run["truth"], minlength=k)
        row = f"  seed {seed} fold {fold}: {score(run, 1.0):.4f} -> {score(run, best):.4f}; recall (support)"
        predicted = {w: (run["blind"] + w * run["evidence"]).argmax(1) for w in (1.0, best)}
        cells = [
            f"{name} {np.mean(predicted[1.0][run['truth'] == c] == c):.2f}->"
            f"{np.mean(predicted[best][run['truth'] == c] == c):.2f} ({support[c]})"
            for c, name in enumerate(classes)
            if support[c]
        ]
        print(row, *cells)


if __name__ == "__main__":
    main()
