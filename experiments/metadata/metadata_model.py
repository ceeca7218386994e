"""Which metadata model late fusion should fit, measured offline on a cross-validated study's image-only predictions.

    python experiments/metadata/metadata_model.py --study docs/study-cpu --variant baseline \
        --manifest isic2018-cache/manifest.csv [--tune-fold 0]

For each finished fold run of the variant, every candidate metadata model is fitted on that fold's training images
with metadata (as ``fit`` does: ``SkinFusionDataModule(cv_folds=K, cv_fold=k).records("train")``) and its evidence
``log p(c | metadata) - log p(c)`` is added to the run's image-only log-probabilities; the balanced accuracy of the
fold's images is printed per model, with the run's own fused prediction as the check that the current model is
reproduced. Choose on the tuning fold; the other folds say whether the choice holds. Not part of the package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from skinfusion.data.datamodule import SkinFusionDataModule
from skinfusion.data.dataset import META_DIM, SITES, encode_metadata, read_metadata
from skinfusion.nn.late_fusion import MetadataLateFusion

AGE_BINS = np.arange(10, 90, 10)  # decades: <10, 10-19, ..., 80+


def age_bins(meta: dict) -> np.ndarray:
    age = read_metadata(meta)["age"]
    out = np.zeros(len(AGE_BINS) + 1, np.float32)
    if age is not None:
        out[np.searchsorted(AGE_BINS, age, side="right")] = 1.0
    return out


def encodings(meta: dict) -> dict[str, np.ndarray]:
    base = encode_metadata(meta)
    return {"current (age linear)": base, "+ age by decade": np.concatenate([base, age_bins(meta)])}


def evidence(train: list, test: list, classes: list[str], name: str, l2: float) -> np.ndarray:
    """(len(test), K) evidence of a late-fusion model on encoding ``name`` (zeros where no metadata is known)."""
    x = torch.from_numpy(np.stack([encodings(r.meta)[name] for r in train]))
    y = torch.tensor([classes.index(r.label) for r in train])
    model = MetadataLateFusion(x.shape[1], len(classes), unknown_flags=(1, 4, META_DIM - 1))
    model.fit(x, y, l2=l2)
    with torch.no_grad():
        return model(torch.from_numpy(np.stack([encodings(r.meta)[name] for r in test]))).numpy()


def boosted_evidence(train: list, test: list, classes: list[str]) -> np.ndarray:
    """The same evidence from gradient-boosted trees on (age, sex, site) (interactions included), fitted on the
    training images with any field known; zeros where none is."""
    from sklearn.ensemble import HistGradientBoostingClassifier

    def features(records: list) -> tuple[np.ndarray, np.ndarray]:
        rows, known = [], []
        for r in records:
            f = read_metadata(r.meta)
            sex = {"male": 0, "female": 1}.get(f["sex"], np.nan)
            site = float(SITES.index(f["site"])) if f["site"] is not None else np.nan
            rows.append([np.nan if f["age"] is None else f["age"], sex, site])
            known.append(any(v is not None for v in f.values()))
        return np.array(rows, float), np.array(known)

    x, known = features(train)
    y = np.array([classes.index(r.label) for r in train])
    model = HistGradientBoostingClassifier(
        max_iter=200, learning_rate=0.05, max_leaf_nodes=15, categorical_features=[1, 2], random_state=0
    )
    model.fit(x[known], y[known])
    counts = np.bincount(y[known], minlength=len(classes)) + 1.0
    prior = np.log(counts / counts.sum())
    xt, known_t = features(test)
    out = np.zeros((len(test), len(classes)))
    p = np.clip(model.predict_proba(xt[known_t]), 1e-6, None)
    block = np.zeros((int(known_t.sum()), len(classes)))
    block[:, model.classes_] = np.log(p) - prior[model.classes_]
    out[known_t] = block
    return out


def balanced_accuracy(truth: np.ndarray, predicted: np.ndarray, k: int) -> float:
    return float(np.mean([np.mean(predicted[truth == c] == c) for c in range(k) if (truth == c).any()]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, required=True)
    parser.add_argument("--variant", default="full")
    parser.add_argument("--manifest", required=True)
    args = parser.parse_args()
    spec = json.loads((args.study / "spec.json").read_text())
    folds, cv_seed = spec["cv"]["folds"], spec["cv"]["seed"]
    candidates = [(name, l2) for name in ("current (age linear)", "+ age by decade") for l2 in (0.1, 1.0, 10.0)]
    for path in sorted((args.study / "runs").glob(f"{args.variant}-seed*-fold*/result.json")):
        result = json.loads(path.read_text())
        per_image, fold = result["per_image"], result["fold"]
        classes = per_image["class_names"]
        data = SkinFusionDataModule(manifest=args.manifest, cv_folds=folds, cv_fold=fold, cv_seed=cv_seed)
        train = [r for r in data.records("train") if r.label in classes]
        by_id = {r.id: r for r in data.records("val")}
        ids = sorted(per_image["label"])
        truth = np.array([per_image["label"][i] for i in ids])
        blind = np.log(np.clip([per_image["probabilities_image_only"][i] for i in ids], 1e-12, None))
        given = np.array([per_image["probabilities"][i] for i in ids]).argmax(1)
        test = [by_id[i] for i in ids]
        k = len(classes)
        print(
            f"{path.parent.name}: {len(ids)} images; image only {balanced_accuracy(truth, blind.argmax(1), k):.4f}, "
            f"the run's fused prediction {balanced_accuracy(truth, given, k):.4f}"
        )
        for name, l2 in candidates:
            fused = (blind + evidence(train, test, classes, name, l2)).argmax(1)
            agree = np.mean(fused == given) if name.startswith("current") and l2 == 1.0 else float("nan")
            print(
                f"  {name:22s} l2 {l2:4g}: {balanced_accuracy(truth, fused, k):.4f}"
                + (f"  (same argmax as the run's on {agree:.1%})" if not np.isnan(agree) else "")
            )
        fused = (blind + boosted_evidence(train, test, classes)).argmax(1)
        print(f"  {'boosted trees':22s}        : {balanced_accuracy(truth, fused, k):.4f}")


if __name__ == "__main__":
    main()
