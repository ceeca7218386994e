"""Late fusion, measured: an image-only network's probabilities combined with a metadata-only model's.

    python experiments/metadata/late_fusion.py --truth cache/manifest.csv --cv-folds 3 --cv-fold 0 \
        --eval EVAL_DIR [EVAL_DIR ...]

Each EVAL_DIR is ``skinfusion evaluate --cv-folds K --cv-fold k`` of a network without a metadata branch. A
multinomial logistic regression on the encoded age/sex/site (``encode_metadata``) is fitted on the fold's training
images that have metadata (the HAM10000 part of the pool), and an image with metadata gets
``log p_image(c) + log p_meta(c | age, sex, site) - log p_meta(c)`` (Bayes with the metadata model's own prior
divided out); an image without metadata keeps the image model's probabilities, so "unknown" cannot mark a data
set. Prints the balanced accuracy both ways (image only; fused where metadata exists) with each class's recall and
support. An option of the metadata-dropout options table in README; not part of the package.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from skinfusion.data.dataset import encode_metadata, read_metadata
from skinfusion.data.split import assign_folds
from skinfusion.evaluation.isic import read_classification_csv
from skinfusion.inference.inputs import collect_records

CLASSES = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def main() -> None:
    from sklearn.linear_model import LogisticRegression

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--truth", required=True)
    parser.add_argument("--cv-folds", type=int, default=3)
    parser.add_argument("--cv-fold", type=int, default=0)
    parser.add_argument("--cv-seed", type=int, default=0)
    parser.add_argument("--eval", nargs="+", required=True)
    args = parser.parse_args()
    records = collect_records(args.truth)
    pool = [r for r in records if r.meta.get("split") in ("train", "val")]
    folds = assign_folds(pool, args.cv_folds, args.cv_seed)
    has_meta = {r.id: any(v is not None for v in read_metadata(r.meta).values()) for r in pool}
    train = [r for r in pool if folds[r.id] != args.cv_fold and r.label and has_meta[r.id]]
    x = np.stack([encode_metadata(r.meta) for r in train])
    y = np.array([CLASSES.index(r.label) for r in train])
    model = LogisticRegression(max_iter=2000, C=1.0).fit(x, y)
    prior = np.bincount(y, minlength=len(CLASSES)) / len(y)
    by_id = {r.id: r for r in pool}
    out = {}
    for folder in args.eval:
        ids, image_p = read_classification_csv(Path(folder) / "predictions" / "predictions.csv", CLASSES)
        keep = [j for j, i in enumerate(ids) if by_id[i].label]  # mask-only images have no diagnosis
        ids, image_p = [ids[j] for j in keep], image_p[keep]
        truth = np.array([CLASSES.index(by_id[i].label) for i in ids])
        fused = np.log(np.clip(image_p, 1e-8, 1))
        rows = [j for j, i in enumerate(ids) if has_meta[i]]
        proba = model.predict_proba(np.stack([encode_metadata(by_id[ids[j]].meta) for j in rows]))
        adjust = np.zeros((len(rows), len(CLASSES)))
        adjust[:, model.classes_] = np.log(np.clip(proba, 1e-8, 1)) - np.log(prior[model.classes_])
        fused[rows] += adjust
        result = {}
        for name, scores in (("image_only", image_p), ("late_fusion", fused)):
            predicted = scores.argmax(1)
            recalls = {
                c: float((predicted[truth == k] == k).mean()) for k, c in enumerate(CLASSES) if (truth == k).any()
            }
            result[name] = {"balanced_accuracy": float(np.mean(list(recalls.values()))), "recall": recalls}
        result["support"] = {c: int((truth == k).sum()) for k, c in enumerate(CLASSES)}
        out[folder] = result
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
