"""Whether the decision rule leaves balanced accuracy on the table, measured offline on a cross-validated study.

    python experiments/metadata/decision_rule.py --study docs/study-cpu [--variant full ...] [--seeds 0]

The network's argmax already targets balanced accuracy (logit-adjusted loss, square-root balanced sampling). Two
post-hoc rules could still move it, both ways (with the metadata the data has, and on images alone):

* **more logit adjustment**: ``log p - tau * log prior`` (one number; ``prior``: the tuning fold's class
  frequencies), ``tau`` from a grid;
* **per-class offsets**: ``log p + b`` (one number a class), chosen by coordinate ascent on balanced accuracy.

Each is chosen on one fold of a seed's run and applied, unchanged, to that seed's other folds (images it never
saw); every fold takes its turn. Printed per variant and way: the default's balanced accuracy on the checked folds,
and the change each rule makes there (mean, and the range over the tune/check pairs). A rule worth shipping moves
the checked folds up, not only the tuning fold. Not part of the package.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from fusion_weight import balanced_accuracy, load_runs, log_probabilities

TAUS = (-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0)
OFFSETS = np.linspace(-2.0, 2.0, 41)


def log_prior(truth: np.ndarray, k: int) -> np.ndarray:
    return np.log(np.bincount(truth, minlength=k).clip(1) / len(truth))


def best_tau(log_p: np.ndarray, truth: np.ndarray, k: int) -> float:
    prior = log_prior(truth, k)
    scores = [balanced_accuracy(truth, (log_p - tau * prior).argmax(1), k) for tau in TAUS]
    return TAUS[int(np.argmax(scores))]  # ties: the first, the least adjustment


def best_offsets(log_p: np.ndarray, truth: np.ndarray, k: int, sweeps: int = 3) -> np.ndarray:
    offsets = np.zeros(k)
    for _ in range(sweeps):
        for c in range(k):
            scores = []
            for value in OFFSETS:
                trial = offsets.copy()
                trial[c] = value
                scores.append(balanced_accuracy(truth, (log_p + trial).argmax(1), k))
            offsets[c] = OFFSETS[int(np.argmax(scores))]
    return offsets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--variant", nargs="+", default=["baseline", "attention", "fusion", "full"])
    parser.add_argument("--seeds", nargs="+", type=int, help="only these training seeds (default: every finished one)")
    args = parser.parse_args()
    print("| variant | way | tune/check pairs | default, checked folds | + tau (chosen) | + per-class offsets |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for variant in args.variant:
        runs = load_runs(args.study, variant)
        if args.seeds is not None:
            runs = {key: run for key, run in runs.items() if key[0] in args.seeds}
        if not runs:
            print(f"| {variant} | | 0 | (no finished run of seeds {args.seeds}) | | |")
            continue
        k = len(next(iter(runs.values()))["classes"])
        for way in ("with metadata", "images alone"):
            default, tau_gain, offset_gain, taus = [], [], [], []
            for (seed, tune), run in sorted(runs.items()):
                log_p = log_probabilities(run, way)
                tau, offsets = best_tau(log_p, run["truth"], k), best_offsets(log_p, run["truth"], k)
                prior = log_prior(run["truth"], k)
                for (other_seed, fold), other in sorted(runs.items()):
                    if other_seed != seed or fold == tune:
                        continue
                    other_p = log_probabilities(other, way)
                    base = balanced_accuracy(other["truth"], other_p.argmax(1), k)
                    default.append(base)
                    tau_gain.append(balanced_accuracy(other["truth"], (other_p - tau * prior).argmax(1), k) - base)
                    offset_gain.append(balanced_accuracy(other["truth"], (other_p + offsets).argmax(1), k) - base)
                    taus.append(tau)
            if not default:
                print(f"| {variant} | {way} | 0 | (needs two finished folds of one seed) | | |")
                continue

            def gain(values: list[float]) -> str:
                return f"{np.mean(values):+.3f} [{min(values):+.3f}, {max(values):+.3f}]"

            chosen = ", ".join(f"{t:g}" for t in sorted(set(taus)))
            print(
                f"| {variant} | {way} | {len(default)} | {np.mean(default):.3f} | {gain(tau_gain)} ({chosen}) "
                f"| {gain(offset_gain)} |"
            )


if __name__ == "__main__":
    main()
