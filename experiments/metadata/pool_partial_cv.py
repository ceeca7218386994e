"""Seed 0, folds 0 and 1 of the 3-fold CV pooled: balanced accuracy both ways, per-class recall with support,
T1 TJ, with a lesion bootstrap interval (stratified by class; one seed, so the seed is NOT in the interval).

    python experiments/metadata/pool_partial_cv.py CV_ROOT MANIFEST   # reads CV_ROOT/s0/fold{0,1}/eval
"""

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT, MANIFEST = sys.argv[1], sys.argv[2]
C = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
rows = {r["id"]: r for r in csv.DictReader(Path(MANIFEST).read_text().splitlines())}


def read(path):
    out = {}
    for r in csv.DictReader(Path(path).read_text().splitlines()):
        out[r["image"]] = np.array([float(r[c]) for c in C])
    return out


res = {}
for way, rel in (("with metadata", "predictions/predictions.csv"), ("images alone", "image_only/predictions.csv")):
    p = {}
    for k in (0, 1):
        p.update(read(f"{ROOT}/s0/fold{k}/eval/{rel}"))
    ids = [i for i in p if rows[i]["label"] in C]
    y = np.array([C.index(rows[i]["label"]) for i in ids])
    pred = np.array([p[i].argmax() for i in ids])
    lesion = [rows[i]["lesion_id"] or i for i in ids]

    def bacc(idx, pred=pred, y=y):
        return np.mean([(pred[idx][y[idx] == c] == c).mean() for c in range(7)])

    groups = defaultdict(lambda: defaultdict(list))
    for j, (g, c) in enumerate(zip(lesion, y, strict=True)):
        groups[c][g].append(j)
    rng = np.random.default_rng(0)
    reps = []
    glist = {c: [np.array(v) for v in groups[c].values()] for c in groups}
    for _ in range(2000):
        idx = np.concatenate([glist[c][i] for c in glist for i in rng.integers(0, len(glist[c]), len(glist[c]))])
        reps.append(bacc(idx))
    allidx = np.arange(len(ids))
    res[way] = {
        "bacc": bacc(allidx),
        "ci": list(np.percentile(reps, [2.5, 97.5])),
        "images": len(ids),
        "per_class": {
            C[c]: {
                "recall": float((pred[y == c] == c).mean()),
                "images": int((y == c).sum()),
                "lesions": len(groups[c]),
            }
            for c in range(7)
        },
    }
seg = {}
for k in (0, 1):
    for r in csv.DictReader(Path(f"{ROOT}/s0/fold{k}/eval/per_image_segmentation.csv").read_text().splitlines()):
        seg[r["id"]] = float(r["threshold_jaccard"])
t1 = [v for i, v in seg.items() if rows[i]["source"].startswith("isic_task1")]
ham = [v for i, v in seg.items() if not rows[i]["source"].startswith("isic_task1")]
res["T1 TJ"] = {"task1_images": [float(np.mean(t1)), len(t1)], "ham_images": [float(np.mean(ham)), len(ham)]}
for k in (0, 1):
    m = json.loads(Path(f"{ROOT}/s0/fold{k}/eval/metrics.json").read_text())
    res[f"fold{k}"] = {
        x: m[x] for x in ("task3/balanced_accuracy", "task3_image_only/balanced_accuracy", "task1/threshold_jaccard")
    }
print(json.dumps(res, indent=1, default=float))
Path(f"{ROOT}/partial.json").write_text(json.dumps(res, indent=1, default=float))
