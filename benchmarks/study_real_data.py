"""What post-processing, test-time augmentation and temperature scaling change, on a validation split.

    python benchmarks/study_real_data.py --ckpt runs/.../last.ckpt --manifest isic2018-cache/manifest.csv
    python benchmarks/study_real_data.py --ckpt CKPT --manifest M --cv-folds 3 --cv-fold 0  # a CV run's own fold

Predicts the ``--split`` images of a prepared manifest (or, with ``--cv-folds K --cv-fold k``, the validation
fold of ``fit --data.cv_folds K --data.cv_fold k``) once per setting and scores them with the
official-resolution ISIC metrics (:mod:`skinfusion.evaluation.isic`):

* Task 1 thresholded Jaccard / Jaccard / Dice with the raw thresholded mask vs each post-processing
  (hole filling, largest component, opening) and all together, on every image with a mask and on the
  ISIC 2018 Task 1 images alone (the manifest's ``source`` column);
* the same and Task 3 balanced accuracy with and without flip TTA, with the metadata the images have and
  (for a network that reads it) with age, sex and site withheld;
* expected calibration error before and after temperature scaling. The temperature is fitted on one
  half of the split and the ECE measured on the other half, then the halves swap (2-fold), so the
  reported ECE is never measured on the images the temperature was fitted on.

Everything is on the validation split: never tune on the test split.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from skinfusion.data.imageio import read_mask
from skinfusion.evaluation.calibration import expected_calibration_error, fit_temperature
from skinfusion.evaluation.crossval import _manifest_sources
from skinfusion.evaluation.isic import classification_scores, segmentation_scores
from skinfusion.evaluation.report import cv_fold_records, withhold_metadata
from skinfusion.inference.inputs import collect_records
from skinfusion.inference.postprocess import PostProcess
from skinfusion.inference.predictor import Predictor

POSTPROCESSING = {
    "none (threshold 0.5)": PostProcess(fill_holes=False, largest_component=False, opening_radius=0),
    "fill holes": PostProcess(fill_holes=True, largest_component=False, opening_radius=0),
    "largest component": PostProcess(fill_holes=False, largest_component=True, opening_radius=0),
    "opening r=5": PostProcess(fill_holes=False, largest_component=False, opening_radius=5),
    "all (default + opening r=5)": PostProcess(fill_holes=True, largest_component=True, opening_radius=5),
}


def predict(predictor: Predictor, records) -> list:
    return list(predictor.predict_records(records))


def segmentation(predictions, truths, post: PostProcess) -> dict[str, float]:
    masks = [post(p.mask_prob, size=p.size) for p in predictions]
    return segmentation_scores(masks, truths)


def two_fold_ece(probabilities: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    halves = np.array_split(order, 2)
    log_probs = torch.from_numpy(np.log(np.clip(probabilities, 1e-12, 1.0))).float()
    before, after, temperatures = [], [], []
    for fit_idx, eval_idx in ((halves[0], halves[1]), (halves[1], halves[0])):
        t = fit_temperature(log_probs[fit_idx], torch.from_numpy(labels[fit_idx]))
        temperatures.append(t)
        scaled = (log_probs[eval_idx] / t).softmax(-1).numpy()
        before.append(expected_calibration_error(probabilities[eval_idx], labels[eval_idx]))
        after.append(expected_calibration_error(scaled, labels[eval_idx]))
    return {
        "ece_before": float(np.mean(before)),
        "ece_after": float(np.mean(after)),
        "temperature": float(np.mean(temperatures)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--manifest", required=True, help="a prepared manifest (its split column is used)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--cv-folds", type=int, default=0, metavar="K", help="score a CV fold instead of --split")
    parser.add_argument("--cv-fold", type=int, default=0, metavar="k")
    parser.add_argument("--cv-seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="use the first N images of the split (0: all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    records = collect_records(args.manifest)
    if args.cv_folds:
        records, where = cv_fold_records(records, args.cv_folds, args.cv_fold, args.cv_seed), f"cv fold {args.cv_fold}"
    else:
        records, where = [r for r in records if r.meta.get("split", args.split) == args.split], args.split
    if args.limit:
        records = records[: args.limit]
    task1 = {i for i, source in _manifest_sources(args.manifest).items() if source.startswith("isic_task1")}
    print(f"{len(records)} {where} images from {args.manifest}")
    results: dict[str, dict] = {}
    for tta in (False, True):
        predictor = Predictor(args.ckpt, batch_size=args.batch_size, tta=tta, progress=True)
        predictions = predict(predictor, records)
        with_mask = [p for p in predictions if p.record.mask is not None and p.mask_prob is not None]
        truths = [read_mask(p.record.mask).astype(bool) for p in with_mask]
        name = "tta" if tta else "plain"
        results[name] = {"segmentation": {}, "segmentation_task1": {}, "images_with_mask": len(with_mask)}
        is_task1 = [p.record.id in task1 for p in with_mask]
        results[name]["task1_images_with_mask"] = sum(is_task1)
        for label, post in POSTPROCESSING.items():
            if tta and label not in ("none (threshold 0.5)", "fill holes"):
                continue
            results[name]["segmentation"][label] = segmentation(with_mask, truths, post)
            if any(is_task1):
                results[name]["segmentation_task1"][label] = segmentation(
                    [p for p, t in zip(with_mask, is_task1, strict=True) if t],
                    [m for m, t in zip(truths, is_task1, strict=True) if t],
                    post,
                )
        labelled = [p for p in predictions if p.record.label in predictor.class_names and p.probabilities is not None]
        if labelled:
            probs = np.stack([p.probabilities for p in labelled])
            labels = np.array([predictor.class_names.index(p.record.label) for p in labelled])
            one_hot = np.eye(len(predictor.class_names))[labels]
            scores = classification_scores(probs, one_hot, predictor.class_names)
            results[name]["classification"] = {
                "balanced_accuracy": scores["balanced_accuracy"],
                "images_with_label": len(labelled),
            }
            if predictor.meta_dim:  # the same images with age, sex and site withheld: what `predict DIR` sees
                blind = [withhold_metadata(p.record) for p in labelled]
                blind_probs = np.stack([p.probabilities for p in predict(predictor, blind)])
                results[name]["classification"]["balanced_accuracy_image_only"] = classification_scores(
                    blind_probs, one_hot, predictor.class_names
                )["balanced_accuracy"]
            if not tta:
                results[name]["calibration"] = two_fold_ece(probs, labels)

    print("\n| setting | thresholded Jaccard | Jaccard | Dice |\n| --- | ---: | ---: | ---: |")
    for key, count, images in (
        ("segmentation", "images_with_mask", "masks"),
        ("segmentation_task1", "task1_images_with_mask", "Task 1 masks"),
    ):
        for name, result in results.items():
            for label, s in result[key].items():
                print(
                    f"| {name}, {label} ({result[count]} {images}) "
                    f"| {s['threshold_jaccard']:.4f} | {s['jaccard']:.4f} | {s['dice']:.4f} |"
                )
    for name, result in results.items():
        if "classification" in result:
            c = result["classification"]
            blind = (
                f", images alone {c['balanced_accuracy_image_only']:.4f}" if "balanced_accuracy_image_only" in c else ""
            )
            n = c["images_with_label"]
            print(f"{name}: balanced accuracy {c['balanced_accuracy']:.4f}{blind} ({n} labelled images)")
    calibration = results["plain"].get("calibration")
    if calibration:
        print(
            f"ECE (15 bins, 2-fold on the split): {calibration['ece_before']:.4f} before, "
            f"{calibration['ece_after']:.4f} after temperature scaling (T = {calibration['temperature']:.3f})"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
